using LoraSharp.Cli.Commands;
using LoraSharp.Imaging;
using LoraSharp.Tests.Infrastructure;
using SkiaSharp;
using static TorchSharp.torch;

namespace LoraSharp.Tests.Imaging;

public class PngParametersTests
{
    static GenerationParameters Sample(string prompt = "a photo of a cat, (blue eyes:1.2)\nsecond line <lora:style:0.8>") =>
        GenerationParameters.ForTxt2Img(prompt, "lowres, bad anatomy", 20, "DPM++ 2M Karras", 7, 42, 512, 512,
            modelHash: "abcdef1234", modelName: "name", loraHashes: [new("style", "0123456789ab")]);

    [Fact]
    public void Infotext_has_the_a1111_layout()
    {
        var text = GenerationParameters.ForTxt2Img("a cat", "ugly", 20, "DPM++ 2M Karras", 7, 42, 512, 512,
            modelHash: "abcdef1234", modelName: "name", loraHashes: [new("style", "0123456789ab")]).ToInfotext();
        Assert.Equal("a cat\nNegative prompt: ugly\nSteps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 42, Size: 512x512, " +
                     "Model hash: abcdef1234, Model: name, Lora hashes: \"style: 0123456789ab\", Version: LoraSharp", text);
    }

    [Fact]
    public void Empty_negative_prompt_has_no_line()
    {
        var text = GenerationParameters.ForTxt2Img("a cat", "", 20, "Euler a", 7.5, 1, 512, 768).ToInfotext();
        Assert.Equal("a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 1, Size: 512x768, Version: LoraSharp", text);
    }

    [Fact]
    public void Parse_splits_a1111_infotext_with_quoted_values()
    {
        var p = GenerationParameters.Parse("masterpiece, girl\nsmiling\nNegative prompt: lowres,\nblurry\n" +
            "Steps: 30, Sampler: Euler a, CFG scale: 7, Seed: 123, Size: 512x768, Lora hashes: \"a: 111, b: 222\", Extra: \"quote \\\"x\\\"\", Version: v1.10.1");
        Assert.Equal("masterpiece, girl\nsmiling", p.Prompt);
        Assert.Equal("lowres,\nblurry", p.NegativePrompt);
        Assert.Equal("a: 111, b: 222", p.Get("Lora hashes"));
        Assert.Equal("quote \"x\"", p.Get("Extra"));
        Assert.Equal("512x768", p.Get("Size"));
        Assert.Equal("v1.10.1", p.Get("Version"));
        Assert.Equal(["Steps", "Sampler", "CFG scale", "Seed", "Size", "Lora hashes", "Extra", "Version"], p.Settings.Select(kv => kv.Key));
    }

    [Fact]
    public void Text_without_settings_line_is_all_prompt()
    {
        var p = GenerationParameters.Parse("just a prompt\nwith: two lines");
        Assert.Equal("just a prompt\nwith: two lines", p.Prompt);
        Assert.Empty(p.Settings);
    }

    [Fact]
    public void Png_round_trip_keeps_pixels_and_parameters()
    {
        using var tmp = new TempDir();
        using var scope = NewDisposeScope();
        var image = linspace(-1, 1, 3 * 16 * 24).reshape(3, 16, 24);
        var parameters = Sample();
        var path = tmp.File("out.png");
        PngImage.Save(image, path, parameters);

        var read = GenerationParameters.ReadFromPng(path)!;
        Assert.Equal(parameters.Prompt, read.Prompt);
        Assert.Equal(parameters.NegativePrompt, read.NegativePrompt);
        Assert.Equal(parameters.Settings, read.Settings);

        using var bitmap = PngImage.Load(path);
        Assert.Equal((24, 16), (bitmap.Width, bitmap.Height));
        var px = bitmap.GetPixel(5, 2); // channel c at (2,5) = -1 + 2·idx/(N-1)
        byte Expected(int c) => (byte)Math.Round((image[c, 2, 5].item<float>() + 1) * 127.5);
        Assert.Equal((Expected(0), Expected(1), Expected(2)), (px.Red, px.Green, px.Blue));
    }

    [Fact]
    public void Non_latin1_parameters_use_itxt()
    {
        using var scope = NewDisposeScope();
        var png = PngImage.Encode(zeros(3, 8, 8), Sample("猫の写真 🐱"));
        Assert.Contains(PngText.ReadChunks(png), c => c.Type == "iTXt");
        Assert.Equal("猫の写真 🐱", GenerationParameters.Parse(PngText.Read(png)["parameters"]).Prompt);
    }

    [Fact]
    public void Text_chunk_sits_after_ihdr_and_replaces_an_old_one()
    {
        using var scope = NewDisposeScope();
        var png = PngImage.Encode(zeros(3, 4, 4), (GenerationParameters?)null);
        var once = PngText.Insert(png, "parameters", "first");
        var twice = PngText.Insert(once, "parameters", "second");
        var types = PngText.ReadChunks(twice).Select(c => c.Type).ToList();
        Assert.Equal("IHDR", types[0]);
        Assert.Equal("tEXt", types[1]);
        Assert.Single(types, t => t == "tEXt");
        Assert.Equal("second", PngText.Read(twice)["parameters"]);
        using var decoded = SKBitmap.Decode(twice);
        Assert.NotNull(decoded);
    }

    [Fact]
    public void Crc_matches_the_png_specification_check_value() =>
        Assert.Equal(0xCBF43926u, Crc32.Compute("123456789"u8));

    // ---- png-info command ----

    static (int Code, string Out, string Err) RunCli(string path, bool json)
    {
        var o = new StringWriter();
        var e = new StringWriter();
        int code = PngInfoCommand.Run(path, json, o, e);
        return (code, o.ToString(), e.ToString());
    }

    [Fact]
    public void Png_info_prints_prompt_and_settings()
    {
        using var tmp = new TempDir();
        using var scope = NewDisposeScope();
        PngImage.Save(zeros(3, 8, 8), tmp.File("a.png"), Sample("a cat"));
        var (code, output, _) = RunCli(tmp.File("a.png"), json: false);
        Assert.Equal(0, code);
        Assert.Contains("Prompt: a cat", output);
        Assert.Contains("Negative prompt: lowres, bad anatomy", output);
        Assert.Contains("Lora hashes: style: 0123456789ab", output);
        Assert.Contains("Sampler: DPM++ 2M Karras", output);
    }

    [Fact]
    public void Png_info_json_output_parses()
    {
        using var tmp = new TempDir();
        using var scope = NewDisposeScope();
        PngImage.Save(zeros(3, 8, 8), tmp.File("a.png"), Sample("a \"quoted\" cat"));
        var (code, output, _) = RunCli(tmp.File("a.png"), json: true);
        Assert.Equal(0, code);
        var o = System.Text.Json.Nodes.JsonNode.Parse(output)!;
        Assert.Equal("a \"quoted\" cat", (string)o["prompt"]!);
        Assert.Equal("42", (string)o["settings"]!["Seed"]!);
    }

    [Fact]
    public void Png_info_on_a_png_without_parameters_exits_1()
    {
        using var tmp = new TempDir();
        using var scope = NewDisposeScope();
        PngImage.Save(zeros(3, 8, 8), tmp.File("plain.png"));
        var (code, _, err) = RunCli(tmp.File("plain.png"), json: false);
        Assert.Equal(1, code);
        Assert.Contains("no generation parameters", err);
    }

    [Fact]
    public void Png_info_on_a_corrupted_png_exits_2_with_a_clear_error()
    {
        using var tmp = new TempDir();
        using var scope = NewDisposeScope();
        var png = PngImage.Encode(zeros(3, 8, 8), Sample());
        png[50] ^= 0x01; // inside the text chunk data (IHDR ends at 33, tEXt data starts at 41): CRC no longer matches
        File.WriteAllBytes(tmp.File("bad.png"), png);
        var (code, _, err) = RunCli(tmp.File("bad.png"), json: false);
        Assert.Equal(2, code);
        Assert.Contains("CRC mismatch", err);
        Assert.Contains("bad.png", err);
    }

    [Fact]
    public void Png_info_on_a_truncated_or_foreign_file_exits_2()
    {
        using var tmp = new TempDir();
        using var scope = NewDisposeScope();
        var png = PngImage.Encode(zeros(3, 8, 8), Sample());
        File.WriteAllBytes(tmp.File("cut.png"), png[..(png.Length / 2)]);
        File.WriteAllText(tmp.File("text.png"), "not a png at all");
        var (code1, _, err1) = RunCli(tmp.File("cut.png"), json: false);
        var (code2, _, err2) = RunCli(tmp.File("text.png"), json: false);
        var (code3, _, err3) = RunCli(tmp.File("missing.png"), json: false);
        Assert.Equal((2, 2, 2), (code1, code2, code3));
        Assert.Contains("corrupted PNG", err1);
        Assert.Contains("not a PNG file", err2);
        Assert.Contains("file not found", err3);
    }

    [Fact]
    public void Png_info_is_registered_in_the_cli()
    {
        var root = LoraSharp.Cli.CommandLine.Build();
        Assert.Contains(root.Subcommands, c => c.Name == "png-info");
    }

    [Fact]
    public void Reference_decoded_image_round_trips_through_png_pixel_exactly()
    {
        using var tmp = new TempDir();
        using var scope = NewDisposeScope();
        using var file = LoraSharp.IO.SafetensorsFile.Open(ReferenceData.PathOf("sd", "samplers", "euler.safetensors"));
        var image = file.Load("decoded_image"); // [1, 3, 128, 128], roughly [-1, 1], not clamped
        PngImage.Save(image, tmp.File("euler.png"), Sample("a photo of a cat"));
        using var bitmap = PngImage.Load(tmp.File("euler.png"));
        var expected = ((image[0].clamp(-1, 1) + 1) * 127.5).round().to_type(ScalarType.Byte).permute(1, 2, 0).contiguous().data<byte>().ToArray();
        int w = bitmap.Width, mismatches = 0;
        for (int y = 0; y < bitmap.Height; y++)
            for (int x = 0; x < w; x++)
            {
                var px = bitmap.GetPixel(x, y);
                int o = (y * w + x) * 3;
                if (px.Red != expected[o] || px.Green != expected[o + 1] || px.Blue != expected[o + 2]) mismatches++;
            }
        Assert.Equal((128, 128), (bitmap.Width, bitmap.Height));
        Assert.Equal(0, mismatches);
    }
}
