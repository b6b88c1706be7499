using System.Text.Json;
using LoraSharp.IO;
using LoraSharp.Models.Llama;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace LoraSharp.Tests.Llama;

/// <summary>The model against the vectors HF-layout PyTorch produced (shared/reference/llm), case by case.</summary>
public class LlamaReferenceTests(LlamaReferenceFixture fixture) : IClassFixture<LlamaReferenceFixture>
{
    /// <summary>Every tensor of base_model.safetensors is one case.</summary>
    public static TheoryData<string> BaseVectorKeys()
    {
        using var file = SafetensorsFile.Open(LlamaReferenceFixture.FromManifest("base_vectors"));
        return new TheoryData<string>(file.Keys);
    }

    [Theory]
    [MemberData(nameof(BaseVectorKeys))]
    public void Base_activation_matches_reference(string key)
    {
        using var scope = NewDisposeScope();
        using var file = SafetensorsFile.Open(LlamaReferenceFixture.FromManifest("base_vectors"));
        var expected = file.Load(key);
        var actual = Capture(fixture.Model, key);
        Assert.Equal(expected.shape, actual.shape);
        var atol = LlamaReferenceFixture.Tolerance(key == "logits" ? "logits_atol" : "activations_atol");
        var maxDiff = (actual - expected).abs().max().item<float>();
        Assert.True(maxDiff <= atol, $"{key}: max |diff| {maxDiff:g3} > {atol:g3}");
    }

    /// <summary>Runs the reference inputs and returns the activation named like the reference file's key.</summary>
    static Tensor Capture(LlamaForCausalLM model, string key)
    {
        if (key is "rope_cos" or "rope_sin")
        {
            var (cos, sin) = model.Model.Rotary.CosSin(0, 8, ScalarType.Float32, CPU);
            return key == "rope_cos" ? cos : sin;
        }

        Tensor? captured = null;
        nn.Module target = key switch
        {
            "embed_out" => model.Model.EmbedTokens,
            "final_norm_out" => model.Model.Norm,
            "logits" => model.LmHead,
            _ => LayerPart(model, key),
        };
        Action remove = target switch
        {
            nn.Module<Tensor, Tensor> m => m.register_forward_hook((_, _, output) => { captured = output.detach().clone().DetachFromDisposeScope(); return output; }).remove,
            nn.Module<Tensor, LlamaForwardContext, Tensor> m => m.register_forward_hook((_, _, _, output) => { captured = output.detach().clone().DetachFromDisposeScope(); return output; }).remove,
            _ => throw new InvalidOperationException(key),
        };
        try
        {
            using var noGrad = no_grad();
            using var logits = model.call(LlamaReferenceFixture.InputTensor(), null);
        }
        finally
        {
            remove();
        }
        return captured ?? throw new InvalidOperationException($"hook for {key} did not fire");
    }

    static nn.Module LayerPart(LlamaForCausalLM model, string key)
    {
        // layer{i}_input_layernorm_out, layer{i}_attn_out, layer{i}_mlp_out, layer{i}_out
        var rest = key["layer".Length..];
        var i = int.Parse(rest[..rest.IndexOf('_')]);
        var layer = model.Model.Layers[i];
        return rest[(rest.IndexOf('_') + 1)..] switch
        {
            "input_layernorm_out" => layer.InputLayerNorm,
            "attn_out" => layer.SelfAttention,
            "mlp_out" => layer.Mlp,
            "out" => layer,
            var other => throw new InvalidOperationException($"unknown activation {other} in {key}"),
        };
    }

    public static TheoryData<bool> CacheModes() => new(true, false);

    [Theory]
    [MemberData(nameof(CacheModes))]
    public void Greedy_base_generation_matches_reference_ids(bool useCache)
    {
        using var doc = JsonDocument.Parse(File.ReadAllText(LlamaReferenceFixture.FromManifest("generation")));
        var root = doc.RootElement;
        var prompt = root.GetProperty("prompt").EnumerateArray().Select(e => e.GetInt32()).ToList();
        var expected = root.GetProperty("base").EnumerateArray().Select(e => e.GetInt32()).ToList();
        var options = new GenerationOptions { MaxNewTokens = root.GetProperty("max_new_tokens").GetInt32(), UseCache = useCache };
        Assert.Equal(expected, LlamaGenerator.GenerateAll(fixture.Model, prompt, options));
    }

    [Fact]
    public void Reference_model_parameters_are_exactly_the_checkpoint_keys()
    {
        using var file = SafetensorsFile.Open(Path.Combine(LlamaReferenceFixture.FromManifest("model_dir"), "model.safetensors"));
        var names = fixture.Model.named_parameters().Select(p => p.name).OrderBy(n => n, StringComparer.Ordinal);
        Assert.Equal(file.Keys.OrderBy(n => n, StringComparer.Ordinal), names);
    }

    [Fact]
    public void Linear_modules_are_listed_by_their_hf_paths()
    {
        var paths = fixture.Model.LinearModules().Select(m => m.Path).ToList();
        Assert.Contains("model.layers.0.self_attn.q_proj", paths);
        Assert.Contains("model.layers.1.mlp.down_proj", paths);
        Assert.Contains("lm_head", paths);
        Assert.True(paths.Count == 2 * 7 + 1, string.Join(" ", paths));
        Assert.All(fixture.Model.LinearModules(), m => Assert.IsType<Linear>(m.Module));
    }
}
