using LoraSharp.Formats;
using LoraSharp.IO;
using LoraSharp.Tests.Infrastructure;

namespace LoraSharp.Tests.Formats;

public class ConvertTests
{
    static int Cli(params string[] args)
    {
        var error = new StringWriter();
        var saved = Console.Error;
        Console.SetError(error);
        try { return LoraSharp.Cli.CommandLine.Run(args); }
        finally { Console.SetError(saved); LastError = error.ToString(); }
    }

    static string LastError = "";

    [Theory]
    [InlineData("kohya_lora")]
    [InlineData("kohya_locon")]
    public void Kohya_to_diffusers_to_kohya_gives_back_the_same_data_and_hash(string name)
    {
        var input = FormatsFixtures.SdPath($"lora/{name}.safetensors");
        var model = FormatsFixtures.SdPath("model/diffusers");
        using var tmp = new TempDir();
        Assert.Equal(0, Cli("convert", input, tmp.File("d.safetensors"), "--to", "diffusers", "--model", model));
        Assert.Equal(0, Cli("convert", tmp.File("d.safetensors"), tmp.File("k.safetensors"), "--to", "kohya", "--model", model));
        using var original = SafetensorsFile.Open(input);
        using var back = SafetensorsFile.Open(tmp.File("k.safetensors"));
        AdapterFileReferenceTests.AssertSameTensors(original, back);
        Assert.Equal(original.Metadata["sshs_model_hash"], back.Metadata["sshs_model_hash"]);

        using var kohya = AdapterFile.Read(input, FormatsFixtures.SdIndex);
        using var diffusers = AdapterFile.Read(tmp.File("d.safetensors"), FormatsFixtures.SdIndex);
        var expected = kohya.Weights.Modules.ToDictionary(m => m.ModulePath, AdapterScales.Scale);
        Assert.Equal(expected.Count, diffusers.Weights.Modules.Count);
        Assert.All(diffusers.Weights.Modules, m => Assert.Equal(expected[m.ModulePath], AdapterScales.Scale(m), 12));
    }

    [Theory]
    [InlineData("lora")]
    [InlineData("rslora")]
    [InlineData("dora")]
    public void Peft_to_peft_through_kohya_names_is_refused_but_peft_round_trips(string name)
    {
        var dir = FormatsFixtures.LlmPath($"adapters/{name}");
        using var tmp = new TempDir();
        Assert.Equal(2, Cli("convert", dir, tmp.File("k.safetensors"), "--to", "kohya"));
        Assert.Contains("language model", LastError);
        Assert.False(File.Exists(tmp.File("k.safetensors")));
        Assert.Equal(0, Cli("convert", dir, tmp.File("p"), "--to", "peft"));
        using var a = SafetensorsFile.Open(Path.Combine(dir, "adapter_model.safetensors"));
        using var b = SafetensorsFile.Open(Path.Combine(tmp.File("p"), "adapter_model.safetensors"));
        AdapterFileReferenceTests.AssertSameTensors(a, b);
    }

    [Fact]
    public void LoKr_cannot_go_into_a_diffusers_file()
    {
        using var tmp = new TempDir();
        var code = Cli("convert", FormatsFixtures.SdPath("lora/lycoris_lokr.safetensors"), tmp.File("x.safetensors"), "--to", "diffusers",
            "--model", FormatsFixtures.SdPath("model/diffusers"));
        Assert.Equal(2, code);
        Assert.Contains("cannot hold LOKR", LastError);
        Assert.Empty(Directory.GetFiles(tmp.Path));
    }

    [Fact]
    public void Kohya_names_without_a_model_are_refused_with_a_hint()
    {
        using var tmp = new TempDir();
        Assert.Equal(2, Cli("convert", FormatsFixtures.SdPath("lora/kohya_lora.safetensors"), tmp.File("x.safetensors"), "--to", "diffusers"));
        Assert.Contains("--model", LastError);
    }

    [Fact]
    public void Convert_resolves_kohya_names_through_a_single_file_sd_checkpoint_as_through_its_diffusers_folder()
    {
        using var tmp = new TempDir();
        var lora = FormatsFixtures.SdPath("lora/kohya_lora.safetensors");
        var fromFile = LoraSharp.Cli.Commands.ConvertCommand.Run(lora, tmp.File("a.safetensors"), AdapterLayout.Diffusers,
            FormatsFixtures.SdPath("model/tiny_sd15.safetensors"), lenient: false, dtype: null);
        var fromFolder = LoraSharp.Cli.Commands.ConvertCommand.Run(lora, tmp.File("b.safetensors"), AdapterLayout.Diffusers,
            FormatsFixtures.SdPath("model/diffusers"), lenient: false, dtype: null);
        Assert.True(fromFile.Modules > 0);
        Assert.Equal(0, fromFile.Coverage.UnmatchedCount);
        Assert.Equal(fromFolder.Modules, fromFile.Modules);
        using var a = SafetensorsFile.Open(tmp.File("a.safetensors"));
        using var b = SafetensorsFile.Open(tmp.File("b.safetensors"));
        Assert.Equal(b.Keys.Order(StringComparer.Ordinal), a.Keys.Order(StringComparer.Ordinal));
    }
}
