using System.CommandLine;
using LoraSharp.Formats;
using LoraSharp.Imaging;
using LoraSharp.IO;
using LoraSharp.Tests.Infrastructure;
using LoraSharp.Tests.StableDiffusion;

namespace LoraSharp.Tests.Diffusion;

/// <summary><c>lorasharp generate</c> and <c>grid</c> run in-process on the tiny model, read back with <c>png-info</c>.</summary>
public class Txt2ImgCommandTests(Xunit.Abstractions.ITestOutputHelper output)
{
    static (int Exit, string Out, string Err) Run(params string[] args)
    {
        var stdout = new StringWriter();
        var stderr = new StringWriter();
        int exit = LoraSharp.Cli.CommandLine.Build().Parse(args).Invoke(new InvocationConfiguration { Output = stdout, Error = stderr });
        return (exit, stdout.ToString(), stderr.ToString());
    }

    static string Tokenizer => ReferenceData.PathOf("sd", "tokenizer");

    static string[] Common(string model, string loraDir) =>
        ["--model", model, "--tokenizer", Tokenizer, "--sampler", "Euler", "--cfg", "7", "--width", "64", "--height", "64",
         "--lora-dir", loraDir, "--no-progress"];

    [Fact]
    public void Generate_writes_numbered_pngs_whose_parameters_png_info_reads_back()
    {
        using var loras = Txt2ImgFixture.LoraFolder();
        using var tmp = new TempDir();
        var outDir = tmp.File("out");
        string[] args = ["generate", .. Common(Txt2ImgFixture.ModelDir, loras.Path), "--prompt", "a photo of a (cat:1.2) <lora:style:0.8>",
            "--negative", "blurry", "--seed", "42", "--steps", "3", "--clip-skip", "2", "--batch", "2", "--out", outDir];
        var (exit, stdout, stderr) = Run(args);
        output.WriteLine(stdout + stderr);
        Assert.Equal(0, exit);
        var files = stdout.Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
        Assert.Equal([Path.Combine(outDir, "00000-42.png"), Path.Combine(outDir, "00001-43.png")], files);
        Assert.All(files, f => Assert.True(File.Exists(f)));

        // png-info's command writes to the process console; its Run takes the writers.
        var infoWriter = new StringWriter();
        int infoExit = LoraSharp.Cli.Commands.PngInfoCommand.Run(files[1], false, infoWriter, infoWriter);
        var info = infoWriter.ToString();
        Assert.Equal(0, infoExit);
        output.WriteLine(info);
        using var lora = SafetensorsFile.Open(Path.Combine(loras.Path, "style.safetensors"));
        Assert.Contains("Prompt: a photo of a (cat:1.2) <lora:style:0.8>", info);
        Assert.Contains("Negative prompt: blurry", info);
        Assert.Contains("Steps: 3", info);
        Assert.Contains("Sampler: Euler", info);
        Assert.Contains("CFG scale: 7", info);
        Assert.Contains("Seed: 43", info);
        Assert.Contains("Size: 64x64", info);
        Assert.Contains("Model: diffusers", info);
        Assert.Contains("Clip skip: 2", info);
        Assert.Contains($"Lora hashes: style: {lora.Metadata["sshs_model_hash"][..12]}", info);
        using (var bitmap = PngImage.Load(files[0])) Assert.Equal((64, 64), (bitmap.Width, bitmap.Height));

        // The numbering continues in the same folder.
        var (exit2, stdout2, _) = Run(["generate", .. Common(Txt2ImgFixture.ModelDir, loras.Path), "--prompt", "a cat", "--seed", "5", "--steps", "1", "--out", outDir]);
        Assert.Equal(0, exit2);
        Assert.Equal(Path.Combine(outDir, "00002-5.png"), stdout2.Trim());
    }

    [Fact]
    public void Generate_from_a_single_file_writes_the_a1111_model_hash()
    {
        using var loras = Txt2ImgFixture.LoraFolder();
        using var tmp = new TempDir();
        var file = SdReference.SingleFile("sd");
        var (exit, stdout, stderr) = Run(["generate", .. Common(file, loras.Path), "--config", Txt2ImgFixture.ModelDir, "--prompt", "a cat", "--seed", "7",
            "--steps", "2", "--out", tmp.Path, "--dtype", "bf16", "--merge-loras"]);
        output.WriteLine(stdout + stderr);
        Assert.Equal(0, exit);
        var p = GenerationParameters.ReadFromPng(stdout.Trim())!;
        Assert.Equal(AdapterHashes.FileSha256(file)[..10], p.Get("Model hash"));
        Assert.Equal(Path.GetFileNameWithoutExtension(file), p.Get("Model"));
    }

    [Fact]
    public void Generate_refuses_hostile_lora_names_and_a_missing_lora_folder()
    {
        using var loras = Txt2ImgFixture.LoraFolder();
        using var tmp = new TempDir();
        var (exit, stdout, _) = Run(["generate", .. Common(Txt2ImgFixture.ModelDir, loras.Path), "--prompt", "cat <lora:../style:1>", "--steps", "1", "--out", tmp.Path]);
        Assert.Equal(2, exit);
        Assert.Equal("", stdout);
        Assert.Empty(Directory.EnumerateFiles(tmp.Path));
        var (exit2, _, _) = Run(["generate", .. Common(Txt2ImgFixture.ModelDir, tmp.File("nope")), "--prompt", "cat", "--steps", "1", "--out", tmp.Path]);
        Assert.Equal(2, exit2);
    }

    [Fact]
    public void Grid_of_lora_weights_by_seeds_is_one_labelled_png()
    {
        using var loras = Txt2ImgFixture.LoraFolder();
        using var tmp = new TempDir();
        var gridPath = tmp.File("grid.png");
        var (exit, stdout, stderr) = Run(["grid", .. Common(Txt2ImgFixture.ModelDir, loras.Path), "--prompt", "a photo of a cat", "--lora", "style",
            "--weights", "0,1", "--rows", "seeds:1,2", "--steps", "2", "--out", gridPath]);
        output.WriteLine(stdout + stderr);
        Assert.Equal(0, exit);
        Assert.Equal(gridPath, stdout.Trim());
        using var grid = PngImage.Load(gridPath);
        Assert.True(grid.Width > 2 * 64 && grid.Width < 2 * 64 + 200, $"width {grid.Width}");
        Assert.True(grid.Height > 2 * 64 && grid.Height < 2 * 64 + 100, $"height {grid.Height}");
        var p = GenerationParameters.ReadFromPng(gridPath)!;
        Assert.Equal("1", p.Get("Seed"));
        Assert.Equal("a photo of a cat <lora:style:0>", p.Prompt);

        var (exit2, _, _) = Run(["grid", .. Common(Txt2ImgFixture.ModelDir, loras.Path), "--prompt", "a cat", "--seeds", "3,4,5", "--steps", "1", "--out", gridPath]);
        Assert.Equal(0, exit2);
        using var grid2 = PngImage.Load(gridPath);
        Assert.True(grid2.Width >= 3 * 64 && grid2.Height > 64);
    }

    [Fact]
    public void Grid_refuses_bad_axes()
    {
        using var loras = Txt2ImgFixture.LoraFolder();
        using var tmp = new TempDir();
        string[] common = ["grid", .. Common(Txt2ImgFixture.ModelDir, loras.Path), "--prompt", "cat", "--steps", "1", "--out", tmp.File("g.png")];
        Assert.Equal(2, Run([.. common, "--loras", "style,../x"]).Exit);
        Assert.Equal(2, Run([.. common, "--weights", "0,1"]).Exit);                 // no --lora
        Assert.Equal(2, Run([.. common, "--seeds", "1", "--loras", "style"]).Exit);  // two column axes
        Assert.Equal(2, Run([.. common, "--seeds", "1,2", "--rows", "seeds:3"]).Exit);
        Assert.Equal(2, Run([.. common, "--seeds", "1,2", "--rows", "colors:3"]).Exit);
        Assert.False(File.Exists(tmp.File("g.png")));
    }
}
