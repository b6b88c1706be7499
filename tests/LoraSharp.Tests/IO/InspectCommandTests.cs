using System.CommandLine;
using System.Text.Json;
using LoraSharp.IO;
using LoraSharp.Tests.Infrastructure;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Tests.IO;

/// <summary>`lorasharp inspect` run in-process through the real root command.</summary>
public class InspectCommandTests
{
    static (int Exit, string Out, string Err) Run(params string[] args)
    {
        var output = new StringWriter();
        var error = new StringWriter();
        int exit = LoraSharp.Cli.CommandLine.Build().Parse(args).Invoke(new InvocationConfiguration { Output = output, Error = error });
        return (exit, output.ToString(), error.ToString());
    }

    static string Kohya => ReferenceData.PathOf("sd", "lora", "kohya_lora.safetensors");

    [Fact]
    public void Inspect_prints_size_counts_dtype_histogram_first_50_keys_and_metadata()
    {
        var (exit, output, error) = Run("inspect", Kohya);
        Assert.Equal(0, exit);
        Assert.Equal("", error);
        Assert.Contains("safetensors", output);
        Assert.Contains("297,296 bytes", output);
        Assert.Contains("tensors (first 50 of 612; --all for every one)", output);
        Assert.Contains("52,940", output); // parameter count
        Assert.Contains("lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight", output);
        Assert.Contains("[4, 32]", output);
        Assert.Contains("ss_network_module", output);
        Assert.Contains("networks.lora", output);
        using var f = SafetensorsFile.Open(Kohya);
        Assert.DoesNotContain(f.Keys[50] + " ", output);
    }

    [Fact]
    public void Inspect_all_lists_every_key_and_limit_caps_the_list()
    {
        using var f = SafetensorsFile.Open(Kohya);
        var (exit, output, _) = Run("inspect", Kohya, "--all");
        Assert.Equal(0, exit);
        Assert.All(f.Keys, k => Assert.Contains(k, output));
        (exit, output, _) = Run("inspect", Kohya, "--limit", "3");
        Assert.Equal(0, exit);
        Assert.Contains("first 3 of 612", output);
        Assert.DoesNotContain(f.Keys[3] + " ", output);
    }

    [Fact]
    public void Inspect_json_is_machine_readable_and_complete()
    {
        var (exit, output, _) = Run("inspect", ReferenceData.PathOf("sd", "model", "tiny_sd15.ckpt"), "--json");
        Assert.Equal(0, exit);
        using var doc = JsonDocument.Parse(output);
        var root = doc.RootElement;
        Assert.Equal(965, root.GetProperty("tensor_count").GetInt32());
        Assert.Equal(965, root.GetProperty("tensors").GetArrayLength());
        Assert.Equal(2_342_320, root.GetProperty("parameter_count").GetInt64());
        Assert.Equal(1, root.GetProperty("dtypes").GetProperty("F16").GetProperty("tensors").GetInt32());
        var first = root.GetProperty("tensors")[0];
        Assert.Equal("state_dict.model.diffusion_model.input_blocks.0.0.bias", first.GetProperty("key").GetString());
        Assert.Equal(16, first.GetProperty("shape")[0].GetInt64());
    }

    [Fact]
    public void Inspect_pretty_prints_json_metadata_values()
    {
        using var dir = new TempDir();
        using (var scope = NewDisposeScope())
            SafetensorsWriter.Write(dir.File("m.safetensors"), new Dictionary<string, Tensor> { ["w"] = ones(2, 2) },
                new Dictionary<string, string> { ["config"] = "{\"r\":4,\"targets\":[\"q\",\"v\"]}", ["plain"] = "text" });
        var (exit, output, _) = Run("inspect", dir.File("m.safetensors"));
        Assert.Equal(0, exit);
        Assert.Contains("\"r\": 4,", output);
        Assert.Contains("\"targets\": [", output);
        var (_, json, _) = Run("inspect", dir.File("m.safetensors"), "--json");
        using var doc = JsonDocument.Parse(json);
        Assert.Equal("{\"r\":4,\"targets\":[\"q\",\"v\"]}", doc.RootElement.GetProperty("metadata").GetProperty("config").GetString());
    }

    [Fact]
    public void Inspect_of_a_bad_file_exits_2_with_one_clear_line_on_stderr()
    {
        using var dir = new TempDir();
        File.WriteAllBytes(dir.File("bad.safetensors"), [8, 0, 0, 0, 0, 0, 0, 0, (byte)'{', (byte)'"', 1, 2]);
        foreach (var path in new[] { dir.File("bad.safetensors"), dir.File("missing.ckpt") })
        {
            var (exit, output, error) = Run("inspect", path);
            Assert.Equal(2, exit);
            Assert.Equal("", output);
            var lines = error.TrimEnd().Split('\n');
            Assert.Single(lines);
            Assert.StartsWith("error: " + path, lines[0]);
            Assert.DoesNotContain("Exception", error);
        }
    }
}
