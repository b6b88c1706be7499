using System.Text.Json.Nodes;
using LoraSharp.Adapters;
using LoraSharp.Formats;
using LoraSharp.IO;
using LoraSharp.Models.Llama;
using LoraSharp.Models.StableDiffusion;
using LoraSharp.Tests.Infrastructure;
using LoraSharp.Tests.Llama;
using static TorchSharp.torch;
using static LoraSharp.Tests.Adapters.TestTrees;

namespace LoraSharp.Tests.Adapters;

/// <summary>
/// The whole path a user takes — Formats reads the file, AdapterHost attaches it to the real model — against the
/// outputs the Python tools recorded: PEFT logits on the tiny Llama, kohya/LyCORIS/diffusers UNet and text-encoder
/// outputs on the tiny SD 1.5, unmerged at each recorded multiplier and merged.
/// </summary>
public class EndToEndReferenceTests
{
    static JsonNode LlmManifest => ReferenceData.ReadJson("llm", "manifest.json");
    static JsonNode SdManifest => ReferenceData.ReadJson("sd", "manifest.json");

    public static TheoryData<string> LlmCases() => ReferenceDeltaTests.LlmCases();
    public static TheoryData<string> SdCases() => ReferenceDeltaTests.SdCases();

    [Theory]
    [MemberData(nameof(LlmCases))]
    public void Peft_adapter_on_the_llama_model_reproduces_reference_logits(string name)
    {
        using var scope = NewDisposeScope();
        var entry = LlmManifest["adapters"]!.AsArray().First(a => a!["name"]!.GetValue<string>() == name)!;
        double atol = LlmManifest["tolerances"]!["logits_atol"]!.GetValue<double>();
        using var model = LlamaCheckpoint.Load(LlamaReferenceFixture.FromManifest("model_dir"));
        var ids = LlamaReferenceFixture.InputTensor();
        using var host = new AdapterHost(model);
        Assert.Empty(AdapterHost.ModulesNotCalled(model, () => { using var _ = no_grad(); model.Logits(ids); }));
        using var read = AdapterFile.Read(ReferenceData.PathOf("llm", entry["dir"]!.GetValue<string>()), ModuleIndex.FromModule(model));
        var a = host.Attach(read.Weights);
        using var refs = SafetensorsFile.Open(ReferenceData.PathOf("llm", entry["vectors"]!.GetValue<string>()));
        var keys = entry["keys"]!;
        using var noGrad = no_grad();
        void Check(string key, string what)
        {
            var d = MaxAbs(model.Logits(ids), refs.Load(keys[key]?.GetValue<string>() ?? key));
            Assert.True(d <= atol, $"{name} {what}: max |Δlogits| {d:G3} > {atol}");
        }
        Check("adapted", "unmerged");
        if (entry["scaled"] is { } scaled)
        {
            a.Multiplier = scaled["scale"]!.GetValue<double>();
            Check(scaled["key"]!.GetValue<string>(), "unmerged, scaled");
            a.Multiplier = 1;
        }
        host.Merge();
        Check("merged", "merged");
        host.Unmerge();
        a.Enabled = false;
        Check("base", "disabled");
    }

    static Dictionary<string, Tensor> Outputs(StableDiffusionModel model, JsonNode manifest, IEnumerable<string> baseKeys)
    {
        var result = new Dictionary<string, Tensor>();
        foreach (var baseKey in baseKeys)
        {
            var caseName = manifest["output_to_forward_case"]![baseKey]!.GetValue<string>();
            var fc = manifest["forward"]!.AsArray().First(c => c!["name"]!.GetValue<string>() == caseName)!;
            using var file = SafetensorsFile.Open(ReferenceData.PathOf("sd", fc["file"]!.GetValue<string>()));
            Tensor In(string k) => file.Load(fc["inputs"]![k]!.GetValue<string>());
            if (fc["component"]!.GetValue<string>() == "te")
            {
                using var o = model.TextEncoder!.call(In("input_ids"));
                result[baseKey] = baseKey switch
                {
                    "te_last_hidden_state" => o.LastHiddenState.alias(),
                    "te_penultimate_hidden_state" => o.HiddenStates[^2].alias(),
                    "te_penultimate_final_layer_norm" => model.TextEncoder!.FinalLayerNorm.call(o.HiddenStates[^2]),
                    "te_pooler_output" => o.PooledOutput.alias(),
                    _ => throw new InvalidDataException(baseKey),
                };
            }
            else result[baseKey] = model.Unet.Predict(In("sample"), In("timestep"), In("encoder_hidden_states"));
        }
        return result;
    }

    [Theory]
    [MemberData(nameof(SdCases))]
    public void Sd_adapter_file_on_the_sd_model_reproduces_reference_outputs(string name)
    {
        using var scope = NewDisposeScope();
        var m = SdManifest;
        var entry = m["loras"]!.AsArray().First(a => a!["name"]!.GetValue<string>() == name)!;
        using var model = StableDiffusionModel.FromDiffusers(ReferenceData.PathOf("sd", m["model"]!["diffusers_dir"]!.GetValue<string>()));
        using var host = new AdapterHost(model);
        using var read = AdapterFile.Read(ReferenceData.PathOf("sd", entry["file"]!.GetValue<string>()), ModuleIndex.FromModule(model));
        var a = host.Attach(read.Weights);
        Assert.Equal(entry["n_base_weights_changed"]!.GetValue<int>(), a.Report.Attached.Count);
        using var refs = SafetensorsFile.Open(ReferenceData.PathOf("sd", entry["ref_file"]!.GetValue<string>()));
        using var noGrad = no_grad();
        foreach (var output in entry["outputs"]!.AsArray())
        {
            bool merged = output!["mode"]!.GetValue<string>() == "merged";
            a.Multiplier = output["multiplier"]!.GetValue<double>();
            if (merged) host.Merge();
            var keys = output["keys"]!.AsObject().ToDictionary(kv => kv.Key, kv => kv.Value!.GetValue<string>());
            foreach (var (baseKey, got) in Outputs(model, m, keys.Keys))
            {
                var component = baseKey.StartsWith("te_") ? "te" : "unet";
                var tol = m["tolerances"]![entry["tolerance_outputs"]![component]!.GetValue<string>()]!;
                double atol = tol["atol"]!.GetValue<double>(), rtol = tol["rtol"]!.GetValue<double>();
                var expect = refs.Load(keys[baseKey]);
                var excess = got.sub(expect).abs().sub(expect.abs().mul(rtol)).max().item<float>();
                Assert.True(excess <= atol, $"{name} {output["mode"]} m={a.Multiplier} {baseKey}: max |Δ| {MaxAbs(got, expect):G3}");
            }
            if (merged) host.Unmerge();
        }
    }
}
