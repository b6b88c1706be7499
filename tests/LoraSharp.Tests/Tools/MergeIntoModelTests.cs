using System.Text.Json;
using System.Text.Json.Nodes;
using LoraSharp.Adapters;
using LoraSharp.Formats;
using LoraSharp.IO;
using LoraSharp.Models.StableDiffusion;
using LoraSharp.Tests.Infrastructure;
using LoraSharp.Tools;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Tests.Tools;

/// <summary>
/// lorasharp merge on the tiny SD1.5 reference: the merged checkpoint's UNet and text encoder outputs equal the unmerged
/// LoRA (attached with AdapterHost) and the tools' own merged references, for every LoRA case of the manifest.
/// </summary>
public class MergeIntoModelTests
{
    static JsonObject Manifest => (JsonObject)ReferenceData.ReadJson("sd", "manifest.json");

    public static TheoryData<string> Cases()
    {
        var d = new TheoryData<string>();
        foreach (var c in Manifest["loras"]!.AsArray()) d.Add(c!["name"]!.GetValue<string>());
        return d;
    }

    /// <summary>The base model, loaded once; each test attaches its LoRA with hooks and disposes the host (which removes them).</summary>
    static readonly Lazy<StableDiffusionModel> BaseModel = new(() => LoadSingle(SingleFile));

    static string Diffusers => ReferenceData.PathOf("sd", "model", "diffusers");
    static string SingleFile => ReferenceData.PathOf("sd", "model", "tiny_sd15.safetensors");

    static StableDiffusionModel LoadSingle(string path) =>
        StableDiffusionCheckpoint.Load(path, new StableDiffusionLoadOptions { Config = StableDiffusionConfig.FromDiffusersFolder(Diffusers), LoadVae = false });

    /// <summary>UNet case 1 output and TE last hidden state.</summary>
    static (Tensor Unet, Tensor Te) Outputs(StableDiffusionModel model)
    {
        using var noGrad = no_grad();
        using var unetRef = SafetensorsFile.Open(ReferenceData.PathOf("sd", "forward", "unet_ref.safetensors"));
        using var teRef = SafetensorsFile.Open(ReferenceData.PathOf("sd", "forward", "te_ref.safetensors"));
        var unet = model.Unet.Predict(unetRef.Load("unet_latents"), unetRef.Load("unet_timesteps"), unetRef.Load("unet_ehs"));
        using var te = model.TextEncoder!.call(teRef.Load("input_ids"));
        return (unet, te.LastHiddenState.alias());
    }

    static void Close(Tensor expected, Tensor actual, string what, double atol = 1e-4)
    {
        var diff = actual.sub(expected).abs().sub(expected.abs().mul(1e-4)).max().item<float>();
        Assert.True(diff <= atol, $"{what}: exceeds atol {atol} by {diff:G3} (max |diff| {actual.sub(expected).abs().max().item<float>():G3})");
    }

    [Theory]
    [MemberData(nameof(Cases))]
    public void Merged_single_file_forward_equals_unmerged_lora_and_the_tools_merge(string name)
    {
        var spec = Manifest["loras"]!.AsArray().Select(n => n!.AsObject()).Single(n => n["name"]!.GetValue<string>() == name);
        var lora = ReferenceData.PathOf("sd", spec["file"]!.GetValue<string>());
        using var tmp = new TempDir();
        var output = tmp.File("merged.safetensors");
        var report = LoraMerger.MergeIntoModel(SingleFile, [new LoraInput(lora, 1.0)], output);
        Assert.True(report.Coverage[0].IsComplete, report.Coverage[0].ToText());
        Assert.Equal(spec["n_base_weights_changed"]!.GetValue<int>(), report.ModulesChanged);

        using var scope = NewDisposeScope();
        using var merged = LoadSingle(output);
        var (mu, mt) = Outputs(merged);

        // Unmerged: the base model with the LoRA attached through forward hooks.
        var baseModel = BaseModel.Value;
        using var host = new AdapterHost(baseModel);
        var index = ModuleIndex.FromModule(baseModel.Unet, "unet.").Let(u => ModuleIndex.Combine(u, ModuleIndex.FromModule(baseModel.TextEncoder!, "text_encoder.")));
        using var weights = AdapterFile.Read(lora, index);
        host.Attach(weights.Weights, name, 1.0);
        var (uu, ut) = Outputs(baseModel);
        Close(uu, mu, "unet merged vs unmerged");
        Close(ut, mt, "te merged vs unmerged");

        using var refs = SafetensorsFile.Open(ReferenceData.PathOf("sd", spec["ref_file"]!.GetValue<string>()));
        var keys = spec["outputs"]!.AsArray().Single(o => o!["mode"]!.GetValue<string>() == "merged")!["keys"]!.AsObject();
        Close(refs.Load(keys["unet_out"]!.GetValue<string>()), mu, "unet vs merged_m1 reference");
        if (keys.ContainsKey("te_last_hidden_state"))
            Close(refs.Load(keys["te_last_hidden_state"]!.GetValue<string>()), mt, "te vs merged_m1 reference");
    }

    [Fact]
    public void Diffusers_folder_merges_into_the_same_layout_with_untouched_files_and_tensors_unchanged()
    {
        var lora = ReferenceData.PathOf("sd", "lora", "kohya_locon.safetensors");
        using var tmp = new TempDir();
        var output = tmp.File("merged");
        var report = LoraMerger.MergeIntoModel(Diffusers, [new LoraInput(lora, 0.5)], output, new MergeIntoModelOptions { SaveDType = ScalarType.Float16 });
        Assert.Equal(289, report.ModulesChanged);
        foreach (var f in new[] { "model_index.json", "unet/config.json", "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json" })
            Assert.Equal(File.ReadAllBytes(Path.Combine(Diffusers, f)), File.ReadAllBytes(Path.Combine(output, f)));
        using var before = SafetensorsFile.Open(Path.Combine(Diffusers, "unet", "diffusion_pytorch_model.safetensors"));
        using var after = SafetensorsFile.Open(Path.Combine(output, "unet", "diffusion_pytorch_model.safetensors"));
        Assert.Equal(before.Keys.Order(), after.Keys.Order());
        Assert.Contains("kohya_locon:0.5", after.Metadata["modelspec.merged_from"]);
        using var scope = NewDisposeScope();
        // An untouched tensor is the input cast to fp16; a touched one is W + 0.5·ΔW.
        Assert.Equal("F16", after.Info("conv_in.weight").DType);
        Assert.True(after.Load("conv_in.weight", ScalarType.Float32).equal(before.Load("conv_in.weight").to_type(ScalarType.Float16).to_type(ScalarType.Float32)).all().item<bool>());
        using var w = AdapterFile.Read(lora, BaseModelIndex.FromPath(Diffusers));
        var module = w.Weights.Modules.Single(m => m.ModulePath == "unet.down_blocks.0.resnets.0.conv1");
        var w0 = before.Load("down_blocks.0.resnets.0.conv1.weight");
        var expected = w0.add(LoraMerger.ModuleDelta(w0, w0.shape, [(module, 0.5)], null)).to_type(ScalarType.Float16);
        Assert.True(after.Load("down_blocks.0.resnets.0.conv1.weight").equal(expected).all().item<bool>());
    }

    [Fact]
    public void Llm_folder_merge_equals_peft_merged_deltas_and_keeps_other_files()
    {
        using var tmp = new TempDir();
        var output = tmp.File("merged");
        var model = ReferenceData.PathOf("llm", "model");
        var adapter = ReferenceData.PathOf("llm", "adapters", "dora");
        var report = LoraMerger.MergeIntoModel(model, [new LoraInput(adapter, 1.0)], output);
        Assert.True(report.Coverage[0].IsComplete);
        Assert.True(File.Exists(Path.Combine(output, "config.json")));
        using var before = SafetensorsFile.Open(Path.Combine(model, "model.safetensors"));
        using var after = SafetensorsFile.Open(Path.Combine(output, "model.safetensors"));
        using var refs = SafetensorsFile.Open(ReferenceData.PathOf("llm", "vectors", "dora.safetensors"));
        using var scope = NewDisposeScope();
        int checkedDeltas = 0;
        foreach (var key in refs.Keys.Where(k => k.StartsWith("delta.", StringComparison.Ordinal)))
        {
            var param = key["delta.".Length..];
            var ours = after.Load(param).sub(before.Load(param));
            Assert.True(ours.sub(refs.Load(key)).abs().max().item<float>() < 1e-5, key);
            checkedDeltas++;
        }
        Assert.True(checkedDeltas > 0);
        Assert.True(after.Load("lm_head.weight").equal(before.Load("lm_head.weight")).all().item<bool>());
    }

    [Fact]
    public void Lora_for_another_model_is_refused_naming_the_file()
    {
        using var tmp = new TempDir();
        var e = Assert.Throws<LoraSharpException>(() => LoraMerger.MergeIntoModel(SingleFile,
            [new LoraInput(ReferenceData.PathOf("llm", "adapters", "lora"), 1.0)], tmp.File("x.safetensors")));
        Assert.Contains("adapter_model.safetensors", e.Message);
    }
}

static class LetExtension
{
    public static TR Let<T, TR>(this T value, Func<T, TR> f) => f(value);
}
