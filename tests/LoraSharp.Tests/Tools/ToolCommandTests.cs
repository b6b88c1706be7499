using System.CommandLine;
using LoraSharp.Formats;
using LoraSharp.IO;
using LoraSharp.Tests.Infrastructure;

namespace LoraSharp.Tests.Tools;

/// <summary>The merge, merge-loras, extract and resize verbs run in-process through the real root command.</summary>
public class ToolCommandTests
{
    static int Run(params string[] args) =>
        LoraSharp.Cli.CommandLine.Build().Parse(args).Invoke(new InvocationConfiguration { Output = new StringWriter(), Error = new StringWriter() });

    static string Sd(string f) => ReferenceData.PathOf("sd", f);

    [Fact]
    public void Verbs_write_their_outputs_and_bad_input_exits_with_2()
    {
        using var tmp = new TempDir();
        var merged = tmp.File("merged.safetensors");
        Assert.Equal(0, Run("merge", "--model", Sd("model/tiny_sd15.safetensors"), "--lora", Sd("lora/kohya_lora.safetensors") + ":0.8",
            "--lora", Sd("lora/lycoris_lokr.safetensors") + ":0.5", "--out", merged, "--save-dtype", "fp16"));
        using (var f = SafetensorsFile.Open(merged))
        {
            Assert.Contains("kohya_lora:0.8", f.Metadata["modelspec.merged_from"]);
            Assert.Contains("lycoris_lokr:0.5", f.Metadata["modelspec.merged_from"]);
            Assert.Equal("F16", f.Info("model.diffusion_model.out.2.weight").DType);
        }
        var extracted = tmp.File("extracted.safetensors");
        Assert.Equal(0, Run("extract", "--base", Sd("model/tiny_sd15.safetensors"), "--tuned", merged, "--rank", "4", "--dynamic", "sv_fro", "--value", "0.9", "--out", extracted));
        using (var f = SafetensorsFile.Open(extracted)) Assert.Equal("Dynamic", f.Metadata["ss_network_dim"]);
        var resized = tmp.File("resized.safetensors");
        Assert.Equal(0, Run("resize", extracted, "--rank", "2", "--out", resized, "--verbose"));
        var combined = tmp.File("combined.safetensors");
        Assert.Equal(0, Run("merge-loras", resized + ":0.5", Sd("lora/kohya_lora.safetensors") + ":0.5", "--method", "svd", "--rank", "4", "--out", combined));
        using (var c = AdapterFile.Read(combined)) Assert.NotEmpty(c.Weights.Modules);

        Assert.Equal(2, Run("resize", Sd("lora/lycoris_loha.safetensors"), "--out", tmp.File("x.safetensors")));
        Assert.Equal(2, Run("merge-loras", Sd("lora/kohya_lora.safetensors"), "--method", "ties", "--out", tmp.File("y.safetensors")));
        Assert.Equal(2, Run("merge", "--model", tmp.File("missing.safetensors"), "--lora", Sd("lora/kohya_lora.safetensors"), "--out", tmp.File("z.safetensors")));
    }
}
