using LoraSharp.IO;
using LoraSharp.Models.Llama;
using LoraSharp.Tests.Infrastructure;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace LoraSharp.Tests.Llama;

public class LlamaModelTests
{
    /// <summary>A tiny GQA config; <paramref name="extra"/> (", \"key\": value, ...") overrides or adds fields.</summary>
    internal static LlamaConfig Tiny(string extra = "") => LlamaConfig.Parse(TinyJson(extra));

    internal static string TinyJson(string extra = "")
    {
        var json = System.Text.Json.Nodes.JsonNode.Parse("""
            { "model_type": "llama", "vocab_size": 97, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "max_position_embeddings": 64 }
            """)!.AsObject();
        foreach (var (key, value) in System.Text.Json.Nodes.JsonNode.Parse("{" + extra.TrimStart(' ', ',') + "}")!.AsObject().ToList())
            json[key] = value?.DeepClone();
        return json.ToJsonString();
    }

    static LlamaForCausalLM Random(LlamaConfig config, ScalarType dtype = ScalarType.Float32) =>
        new(config, dtype, CPU, WeightInit.Random, initStd: 0.2, generator: new Generator(7));

    static Tensor Ids(int batch, int seq, int vocab, ulong seed = 3) =>
        randint(0, vocab, [batch, seq], dtype: ScalarType.Int64, generator: new Generator(seed));

    [Fact]
    public void Forward_hooks_fire_on_every_linear_module()
    {
        using var model = Random(Tiny());
        var fired = new HashSet<string>();
        var removers = model.LinearModules()
            .Select(m => m.Module.register_forward_hook((_, _, output) => { fired.Add(m.Path); return output; }))
            .ToList();
        using (no_grad())
        using (var scope = NewDisposeScope())
            model.call(Ids(1, 5, 97), null);
        removers.ForEach(r => r.remove());
        Assert.Equal(model.LinearModules().Select(m => m.Path).OrderBy(p => p), fired.OrderBy(p => p));
        Assert.Equal(2 * 7 + 1, fired.Count);
    }

    [Fact]
    public void A_hook_that_changes_a_linear_output_changes_the_logits()
    {
        using var model = Random(Tiny());
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var ids = Ids(1, 5, 97);
        var before = model.call(ids, null);
        var remover = model.Model.Layers[1].Mlp.DownProj.register_forward_hook((_, _, output) => output * 2);
        var after = model.call(ids, null);
        remover.remove();
        Assert.True((after - before).abs().max().item<float>() > 1e-3);
        Assert.True((model.call(ids, null) - before).abs().max().item<float>() == 0);
    }

    public static TheoryData<string> CacheConfigs() => new(
        "",                                                     // plain GQA llama
        ", \"attention_bias\": true",                           // biases on q/k/v/o
        ", \"model_type\": \"mistral\", \"sliding_window\": 3",  // window shorter than the sequence
        ", \"model_type\": \"qwen2\", \"use_sliding_window\": true, \"sliding_window\": 4, \"max_window_layers\": 1",
        ", \"rope_scaling\": {\"rope_type\": \"dynamic\", \"factor\": 2.0}, \"max_position_embeddings\": 6",
        ", \"rope_scaling\": {\"rope_type\": \"llama3\", \"factor\": 8.0, \"original_max_position_embeddings\": 8}",
        ", \"tie_word_embeddings\": true");

    [Theory]
    [MemberData(nameof(CacheConfigs))]
    public void Logits_with_kv_cache_equal_full_recompute(string extra)
    {
        // Dynamic NTK rescales RoPE by the current length, so (as in HF) past max_position_embeddings cached keys
        // differ from a recompute; up to it the cache must match.
        var config = Tiny(extra);
        using var model = Random(config);
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var ids = Ids(2, 9, 97);
        var full = model.call(ids, null);
        using var cache = model.NewCache();
        var parts = new List<Tensor> { model.call(ids.narrow(1, 0, 4), cache) };
        parts.Add(model.call(ids.narrow(1, 4, 2), cache));           // several new positions with a past
        for (int i = 6; i < 9; i++) parts.Add(model.call(ids.narrow(1, i, 1), cache));
        var incremental = cat(parts, 1);
        Assert.Equal(9, cache.Length);
        var diff = (incremental - full).abs().max().item<float>();
        if (config.RopeScaling?.Type == "dynamic")
            Assert.True((incremental.narrow(1, 0, 6) - model.call(ids.narrow(1, 0, 6), null)).abs().max().item<float>() < 1e-4);
        else
            Assert.True(diff < 1e-4, $"max |cached - full| = {diff}");
    }

    [Fact]
    public void Sliding_window_limits_attention_to_recent_keys()
    {
        var mask = LlamaModel.AttentionMask(past: 2, seq: 3, window: 2, CPU);
        // query positions 2,3,4; keys 0..4; allowed: j <= p and j > p - 2
        bool[] expected = [false, true, true, false, false,
                           false, false, true, true, false,
                           false, false, false, true, true];
        Assert.Equal(expected, mask.data<bool>().ToArray());
        using var windowed = Random(Tiny(", \"sliding_window\": 2"));
        using var plain = Random(Tiny());
        using var scope = NewDisposeScope();
        var ids = Ids(1, 6, 97);
        using var noGrad = no_grad();
        // Same weights (same seed) — the window changes outputs only at positions that see beyond it.
        var a = windowed.call(ids, null); var b = plain.call(ids, null);
        Assert.True((a.narrow(1, 0, 2) - b.narrow(1, 0, 2)).abs().max().item<float>() < 1e-5);
        Assert.True((a.narrow(1, 2, 4) - b.narrow(1, 2, 4)).abs().max().item<float>() > 1e-4);
    }

    [Fact]
    public void Qwen2_config_has_qkv_bias_but_no_output_bias()
    {
        using var model = Random(Tiny(", \"model_type\": \"qwen2\""));
        var names = model.named_parameters().Select(p => p.name).ToHashSet();
        Assert.Contains("model.layers.0.self_attn.q_proj.bias", names);
        Assert.Contains("model.layers.0.self_attn.v_proj.bias", names);
        Assert.DoesNotContain("model.layers.0.self_attn.o_proj.bias", names);
    }

    [Fact]
    public void Tied_embeddings_share_one_tensor()
    {
        using var model = Random(Tiny(", \"tie_word_embeddings\": true"));
        using (no_grad()) model.Model.EmbedTokens.weight![3, 5] = tensor(42f);
        Assert.Equal(42f, model.LmHead.weight![3, 5].item<float>());
    }

    [Fact]
    public void Rope_scaling_types_rescale_inverse_frequencies_like_hf()
    {
        var plain = new RotaryEmbedding(Tiny()).InverseFrequencies(8);
        Assert.Equal(1f, plain[0]);
        Assert.Equal(1f / MathF.Pow(10000f, 2f / 8), plain[1], 6);
        var linear = new RotaryEmbedding(Tiny(", \"rope_scaling\": {\"type\": \"linear\", \"factor\": 4.0}")).InverseFrequencies(8);
        Assert.All(plain.Zip(linear), p => Assert.Equal(p.First / 4, p.Second, 6));
        // dynamic: unchanged up to max_position_embeddings, base grows past it
        var dyn = new RotaryEmbedding(Tiny(", \"rope_scaling\": {\"rope_type\": \"dynamic\", \"factor\": 2.0}"));
        Assert.Equal(plain, dyn.InverseFrequencies(64));
        var grown = dyn.InverseFrequencies(128);
        double theta = 10000 * Math.Pow(2.0 * 128 / 64 - 1, 8 / 6.0);
        Assert.Equal(1 / Math.Pow(theta, 2 / 8.0), grown[1], 5);
        // llama3: wavelengths above old_context/low_freq are divided by factor, below old_context/high_freq kept
        var l3 = new RotaryEmbedding(Tiny(", \"rope_scaling\": {\"rope_type\": \"llama3\", \"factor\": 8.0, \"low_freq_factor\": 1.0, \"high_freq_factor\": 4.0, \"original_max_position_embeddings\": 64}"))
            .InverseFrequencies(8);
        for (int i = 0; i < plain.Length; i++)
        {
            var wavelen = 2 * Math.PI / plain[i];
            if (wavelen < 64 / 4.0) Assert.Equal(plain[i], l3[i]);
            else if (wavelen > 64) Assert.Equal(plain[i] / 8, l3[i], 6);
            else Assert.InRange(l3[i], plain[i] / 8 - 1e-7, plain[i] + 1e-7);
        }
    }

    [Fact]
    public void Bfloat16_model_runs_and_stays_close_to_float32()
    {
        using var f32 = Random(Tiny());
        using var bf16 = new LlamaForCausalLM(Tiny(), ScalarType.BFloat16, CPU, WeightInit.Empty);
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var source = f32.named_parameters().ToDictionary(p => p.name, p => p.parameter);
        foreach (var (name, p) in bf16.named_parameters()) p.copy_(source[name]);
        var ids = Ids(1, 6, 97);
        var a = f32.call(ids, null);
        var b = bf16.call(ids, null);
        Assert.Equal(ScalarType.BFloat16, b.dtype);
        var diff = (a - b.to_type(ScalarType.Float32)).abs().max().item<float>();
        Assert.True(diff < 0.1 * a.abs().max().item<float>(), $"bf16 vs f32 max diff {diff}");
    }

    [Fact]
    public void Forward_does_not_leak_tensors_over_many_steps()
    {
        using var model = Random(Tiny());
        using var ids = Ids(1, 8, 97);
        long Live() { GC.Collect(); GC.WaitForPendingFinalizers(); return DisposeScopeManager.Statistics.ThreadTotalLiveCount; }
        using (no_grad()) model.call(ids, null).Dispose();
        var before = Live();
        for (int i = 0; i < 20; i++)
            using (no_grad()) model.call(ids, null).Dispose();
        Assert.Equal(before, Live());
    }
}
