using System.Text.Json;
using LoraSharp.Adapters;
using LoraSharp.Diffusion;
using LoraSharp.Formats;
using LoraSharp.IO;
using LoraSharp.Models.StableDiffusion;
using LoraSharp.Tests.Infrastructure;
using LoraSharp.Tests.StableDiffusion;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Tests.Diffusion;

/// <summary>
/// Every LoRA case of the sd and sdxl manifests, read from its file by the project's own layouts and attached to the
/// tiny model: unmerged outputs at each recorded multiplier and merged outputs equal the tools' references.
/// </summary>
public class StableDiffusionLoraReferenceTests
{
    public static TheoryData<string, string> Cases()
    {
        var data = new TheoryData<string, string>();
        foreach (var set in SdReference.Sets)
            foreach (var lora in SdReference.Manifest(set).GetProperty("loras").EnumerateArray())
                data.Add(set, lora.GetProperty("name").GetString()!);
        return data;
    }

    // A model per test (adapters change weights and hooks; the shared forward-test models must stay untouched).
    static StableDiffusionModel FreshModel(string set) => StableDiffusionModel.FromDiffusers(SdReference.DiffusersDir(set));

    /// <summary>One attach per file; every recorded output (unmerged at each multiplier, then merged) is compared.</summary>
    [Theory]
    [MemberData(nameof(Cases))]
    public void Lora_file_reproduces_the_tools_outputs(string set, string loraName)
    {
        var lora = SdReference.Manifest(set).GetProperty("loras").EnumerateArray().Single(l => l.GetProperty("name").GetString() == loraName);
        using var model = FreshModel(set);
        var before = model.named_parameters().ToDictionary(p => p.name, p => p.parameter.detach().clone());
        using var refFile = SafetensorsFile.Open(SdReference.PathOf(set, lora.GetProperty("ref_file").GetString()!));
        using (var host = new AdapterHost(model))
        {
            var attached = StableDiffusionLoras.Attach(host, model, SdReference.PathOf(set, lora.GetProperty("file").GetString()!), loraName);
            Assert.Equal(lora.GetProperty("n_base_weights_changed").GetInt32(), attached.Modules.Count);
            // Unmerged outputs first, merged last (merging changes the weights until detached).
            foreach (var output in lora.GetProperty("outputs").EnumerateArray().OrderBy(o => o.GetProperty("mode").GetString() == "merged"))
            {
                double multiplier = output.GetProperty("multiplier").GetDouble();
                string mode = output.GetProperty("mode").GetString()!;
                StableDiffusionLoras.SetMultipliers(attached, multiplier, multiplier);
                if (mode == "merged") host.Merge();
                using var scope = NewDisposeScope();
                using var noGrad = no_grad();
                var actual = set == "sdxl" ? SdxlOutputs(model) : Sd1Outputs(model);
                int compared = 0;
                foreach (var pair in output.GetProperty("keys").EnumerateObject())
                {
                    var tolName = lora.GetProperty("tolerance_outputs").GetProperty(pair.Name.StartsWith("unet", StringComparison.Ordinal) ? "unet" : "te").GetString()!;
                    SdReference.AssertClose(refFile.Load(pair.Value.GetString()!), actual[pair.Name], SdReference.Tolerance(set, tolName),
                        $"{set}/{loraName}/{mode} m={multiplier}/{pair.Name}");
                    compared++;
                }
                Assert.True(compared > 0);
            }
        }
        // Detaching restores the base exactly.
        foreach (var (name, p) in model.named_parameters())
            Assert.True(p.equal(before[name]).all().item<bool>(), $"{name} not restored");
        foreach (var t in before.Values) t.Dispose();
    }

    static Tensor Load(string set, string caseName, string input)
    {
        var c = SdReference.ForwardCase(set, caseName);
        using var file = SafetensorsFile.Open(SdReference.PathOf(set, c.GetProperty("file").GetString()!));
        return file.Load(c.GetProperty("inputs").GetProperty(input).GetString()!);
    }

    static Dictionary<string, Tensor> Sd1Outputs(StableDiffusionModel model)
    {
        var te = model.TextEncoder!;
        using var o = te.call(Load("sd", "text_encoder", "input_ids"));
        var r = new Dictionary<string, Tensor>
        {
            ["te_last_hidden_state"] = o.LastHiddenState.alias(),
            ["te_penultimate_hidden_state"] = o.HiddenStates[^2].alias(),
            ["te_penultimate_final_layer_norm"] = te.FinalLayerNorm.call(o.HiddenStates[^2]),
            ["te_pooler_output"] = o.PooledOutput.alias(),
            ["unet_out"] = model.Unet.Predict(Load("sd", "unet_case1", "sample"), Load("sd", "unet_case1", "timestep"), Load("sd", "unet_case1", "encoder_hidden_states")),
            ["unet2_out"] = model.Unet.Predict(Load("sd", "unet_case2", "sample"), Load("sd", "unet_case2", "timestep"), Load("sd", "unet_case2", "encoder_hidden_states")),
        };
        return r;
    }

    static Dictionary<string, Tensor> SdxlOutputs(StableDiffusionModel model)
    {
        using var o1 = model.TextEncoder!.call(Load("sdxl", "text_encoders", "input_ids"));
        using var o2 = model.TextEncoder2!.call(Load("sdxl", "text_encoders", "input_ids_2"));
        var context = cat([o1.HiddenStates[^2], o2.HiddenStates[^2]], -1);
        return new Dictionary<string, Tensor>
        {
            ["te1_last_hidden_state"] = o1.LastHiddenState.alias(),
            ["te1_penultimate_hidden_state"] = o1.HiddenStates[^2].alias(),
            ["te1_pooler_output"] = o1.PooledOutput.alias(),
            ["te2_last_hidden_state"] = o2.LastHiddenState.alias(),
            ["te2_penultimate_hidden_state"] = o2.HiddenStates[^2].alias(),
            ["te2_pooler_output"] = o2.PooledOutput.alias(),
            ["te2_text_embeds"] = o2.TextEmbeds!.alias(),
            ["context"] = context,
            // The whole SDXL conditioning chain runs with the LoRA: the UNet gets the adapted context and embeds.
            ["unet_out"] = model.Unet.Predict(Load("sdxl", "unet", "sample"), Load("sdxl", "unet", "timestep"), context,
                o2.TextEmbeds!, Load("sdxl", "unet", "time_ids")),
        };
    }

    [Fact]
    public void Sdxl_kohya_names_resolve_through_sgm_aliases_and_are_written_back_identically()
    {
        using var model = FreshModel("sdxl");
        var file = SdReference.PathOf("sdxl", "lora/kohya_lora.safetensors");
        using var loaded = StableDiffusionLoras.Read(model, file);
        Assert.True(loaded.Coverage.IsComplete, loaded.Coverage.ToText());
        Assert.Equal(BaseFamily.SDXL, loaded.Base.Family);
        using var tmp = new TempDir();
        KohyaAdapterWriter.Write(tmp.File("out.safetensors"), loaded.Weights, new KohyaWriteOptions { NameOf = StableDiffusionLoras.KohyaNameOf(model) });
        using var original = SafetensorsFile.Open(file);
        using var ours = SafetensorsFile.Open(tmp.File("out.safetensors"));
        Assert.Equal(original.Keys.Order(StringComparer.Ordinal), ours.Keys.Order(StringComparer.Ordinal));
        Assert.Equal(original.Metadata["sshs_model_hash"], ours.Metadata["sshs_model_hash"]);
    }
}
