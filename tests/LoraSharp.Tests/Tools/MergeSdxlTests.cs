using System.Text.Json.Nodes;
using LoraSharp.IO;
using LoraSharp.Models.StableDiffusion;
using LoraSharp.Tests.Infrastructure;
using LoraSharp.Tools;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Tests.Tools;

/// <summary>
/// merge into the tiny SDXL single file (SGM layout: kohya names of UNet modules are SGM paths, the second text encoder's
/// q/k/v are row blocks of OpenCLIP's fused in_proj_weight): outputs equal kohya's merged references.
/// </summary>
public class MergeSdxlTests
{
    [Fact]
    public void Sdxl_single_file_merge_matches_the_tools_merged_outputs()
    {
        var manifest = (JsonObject)ReferenceData.ReadJson("sdxl", "manifest.json");
        var spec = manifest["loras"]!.AsArray().Select(n => n!.AsObject()).Single(n => n["name"]!.GetValue<string>() == "kohya_lora");
        var single = ReferenceData.PathOf("sdxl", manifest["model"]!["single_file_safetensors"]!.GetValue<string>());
        var diffusers = ReferenceData.PathOf("sdxl", manifest["model"]!["diffusers_dir"]!.GetValue<string>());
        using var tmp = new TempDir();
        var output = tmp.File("merged.safetensors");
        var report = LoraMerger.MergeIntoModel(single, [new LoraInput(ReferenceData.PathOf("sdxl", spec["file"]!.GetValue<string>()), 1.0)], output);
        Assert.True(report.Coverage[0].IsComplete, report.Coverage[0].ToText());
        Assert.Equal(spec["n_base_weights_changed"]!.GetValue<int>(), report.ModulesChanged);

        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        using var model = StableDiffusionCheckpoint.Load(output, new StableDiffusionLoadOptions { Config = StableDiffusionConfig.FromDiffusersFolder(diffusers), LoadVae = false });
        using var te = SafetensorsFile.Open(ReferenceData.PathOf("sdxl", "forward", "te_ref.safetensors"));
        using var un = SafetensorsFile.Open(ReferenceData.PathOf("sdxl", "forward", "unet_ref.safetensors"));
        using var refs = SafetensorsFile.Open(ReferenceData.PathOf("sdxl", spec["ref_file"]!.GetValue<string>()));
        var keys = spec["outputs"]!.AsArray().Single(o => o!["mode"]!.GetValue<string>() == "merged")!["keys"]!.AsObject();
        using var c = model.EncodeText(te.Load("input_ids"), te.Load("input_ids_2"));
        Close(refs.Load(keys["context"]!.GetValue<string>()), c.Context, "context");
        Close(refs.Load(keys["te2_text_embeds"]!.GetValue<string>()), c.PooledTextEmbeds!, "pooled");
        var unet = model.Unet.Predict(un.Load("unet_latents"), un.Load("unet_timesteps"), c.Context, c.PooledTextEmbeds!, un.Load("unet_time_ids")); // whole chain: the UNet sees the merged encoders' outputs
        Close(refs.Load(keys["unet_out"]!.GetValue<string>()), unet, "unet");
    }

    static void Close(Tensor expected, Tensor actual, string what)
    {
        var excess = actual.sub(expected).abs().sub(expected.abs().mul(1e-4)).max().item<float>();
        Assert.True(excess <= 1e-4, $"{what}: max |diff| {actual.sub(expected).abs().max().item<float>():G3}");
    }
}
