using System.Diagnostics;
using System.Globalization;
using LoraSharp.Models.Llama;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Bench;

/// <summary>
/// Prefill and decode throughput of <see cref="LlamaForCausalLM"/> on a ~110M-parameter random model made in memory
/// (hidden 768, 12 layers, 12 heads / 4 kv heads, MLP 2048, vocab 32000, tied embeddings), batch 1, in float32 and
/// bfloat16. Prefill = one forward over the prompt (logits of the last position); decode = greedy steps with the KV
/// cache. Options: --prompt N (default 128), --new N (default 64), --runs N (default 3, median reported).
/// </summary>
public static class LlamaBenchmark
{
    public static int Run(string[] args)
    {
        int promptLength = 128, newTokens = 64, runs = 3;
        for (int i = 0; i < args.Length; i++)
        {
            switch (args[i])
            {
                case "--prompt": promptLength = int.Parse(args[++i], CultureInfo.InvariantCulture); break;
                case "--new": newTokens = int.Parse(args[++i], CultureInfo.InvariantCulture); break;
                case "--runs": runs = int.Parse(args[++i], CultureInfo.InvariantCulture); break;
                case "--profile": Profile(); return 0;
                default: Console.Error.WriteLine($"unknown option {args[i]} (--prompt N, --new N, --runs N)"); return 2;
            }
        }

        var config = LlamaConfig.Parse("""
            { "model_type": "llama", "vocab_size": 32000, "hidden_size": 768, "intermediate_size": 2048,
              "num_hidden_layers": 12, "num_attention_heads": 12, "num_key_value_heads": 4,
              "max_position_embeddings": 2048, "tie_word_embeddings": true }
            """);
        Console.WriteLine($"model: {config.ParameterCount() / 1e6:F0}M parameters; prompt {promptLength} tokens, {newTokens} new; {get_num_threads()} threads; median of {runs}");
        var prompt = Enumerable.Range(0, promptLength).Select(i => 1 + (i * 7919) % (config.VocabSize - 1)).ToArray();

        foreach (var dtype in new[] { ScalarType.Float32, ScalarType.BFloat16 })
        {
            using var model = new LlamaForCausalLM(config, dtype, CPU, WeightInit.Random, 0.02, new Generator(0));
            model.eval();
            Prefill(model, prompt); // warm-up
            var prefill = Median(Enumerable.Range(0, runs).Select(_ => Prefill(model, prompt)));
            var decode = Median(Enumerable.Range(0, runs).Select(_ => Decode(model, prompt, newTokens)));
            var floor = Median(Enumerable.Range(0, runs).Select(_ => MatmulFloor(model, 1, newTokens)));
            var prefillFloor = Median(Enumerable.Range(0, runs).Select(_ => MatmulFloor(model, promptLength, 1)));
            Console.WriteLine($"{dtype,-9} prefill {promptLength / prefill,8:F0} tokens/s ({prefill * 1000:F0} ms; Linear-only floor {prefillFloor * 1000:F0} ms, ratio {prefillFloor / prefill:F2})   " +
                              $"decode {newTokens / decode,6:F1} tokens/s ({decode * 1000 / newTokens:F1} ms/token; Linear-only floor {floor * 1000 / newTokens:F1} ms, ratio {floor / decode:F2})");
        }
        return 0;
    }

    static double Prefill(LlamaForCausalLM model, int[] prompt)
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var ids = tensor(prompt.Select(t => (long)t).ToArray()).unsqueeze(0);
        var watch = Stopwatch.StartNew();
        var logits = model.Logits(ids, null, lastOnly: true);
        logits.argmax().item<long>();
        return watch.Elapsed.TotalSeconds;
    }

    /// <summary>Seconds for <paramref name="count"/> cached greedy steps after a prefill that is not timed.</summary>
    static double Decode(LlamaForCausalLM model, int[] prompt, int count)
    {
        using var noGrad = no_grad();
        using var cache = model.NewCache();
        long next;
        using (var scope = NewDisposeScope())
            next = model.Logits(tensor(prompt.Select(t => (long)t).ToArray()).unsqueeze(0), cache, lastOnly: true).argmax().item<long>();
        var watch = Stopwatch.StartNew();
        for (int i = 0; i < count; i++)
        {
            using var scope = NewDisposeScope();
            next = model.Logits(tensor(new[] { next }).unsqueeze(0), cache, lastOnly: true).argmax().item<long>();
        }
        return watch.Elapsed.TotalSeconds;
    }

    /// <summary>
    /// The same Linear layers alone (x @ Wᵀ for every weight, <paramref name="tokens"/> rows, <paramref name="repeats"/> times):
    /// the matmul work a forward cannot avoid, measured in the same run so the ratio survives a busy machine.
    /// </summary>
    static double MatmulFloor(LlamaForCausalLM model, int tokens, int repeats)
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var weights = model.LinearModules().Select(m => m.Module.weight!).ToList();
        var inputs = weights.Select(w => randn([1, tokens, w.shape[1]], dtype: w.dtype)).ToList();
        var watch = Stopwatch.StartNew();
        for (int r = 0; r < repeats; r++)
            for (int i = 0; i < weights.Count; i++)
                nn.functional.linear(inputs[i], weights[i]).Dispose();
        return watch.Elapsed.TotalSeconds;
    }

    static void Profile()
    {
        var config = LlamaConfig.Parse("""{ "vocab_size": 32000, "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 12, "num_key_value_heads": 4, "tie_word_embeddings": true }""");
        using var model = new LlamaForCausalLM(config, ScalarType.Float32, CPU, WeightInit.Random);
        using var noGrad = no_grad();
        using var scope = NewDisposeScope();
        var x = randn(1, 1, 768);
        var ids = tensor(new long[] { 5 }).unsqueeze(0);
        void Time(string name, Action a) { a(); var w = Stopwatch.StartNew(); for (int i = 0; i < 20; i++) a(); Console.WriteLine($"{name,-20} {w.Elapsed.TotalMilliseconds / 20:F2} ms"); }
        var ctxCos = model.Model.Rotary.CosSin(0, 1, ScalarType.Float32, CPU);
        var ctx = new LlamaForwardContext { Cos = ctxCos.Cos, Sin = ctxCos.Sin };
        Time("embed", () => model.Model.EmbedTokens.call(ids));
        Time("norm", () => model.Model.Norm.call(x));
        Time("q_proj", () => model.Model.Layers[0].SelfAttention.QProj.call(x));
        Time("attention", () => model.Model.Layers[0].SelfAttention.call(x, ctx));
        Time("mlp", () => model.Model.Layers[0].Mlp.call(x));
        Time("layer", () => model.Model.Layers[0].call(x, ctx));
        Time("lm_head", () => model.LmHead.call(x));
        var q = randn(1, 12, 1, 64); var k = randn(1, 4, 1, 64);
        Time("rotary", () => RotaryEmbedding.Apply(q, ctx.Cos, ctx.Sin));
        Time("repeat_interleave", () => k.repeat_interleave(3, dim: 1));
        var kk = k.repeat_interleave(3, dim: 1);
        Time("sdpa", () => nn.functional.scaled_dot_product_attention(q, kk, kk));
        Time("sdpa causal", () => nn.functional.scaled_dot_product_attention(q, kk, kk, is_casual: true));
        var q8 = randn(1, 12, 8, 64);
        Time("sdpa 8 causal", () => nn.functional.scaled_dot_product_attention(q8, q8, q8, is_casual: true));
        Time("manual attn", () => torch.softmax(q.matmul(kk.transpose(-2, -1)) / 8.0, -1).matmul(kk));
        Time("whole (no cache)", () => model.Logits(ids, null, lastOnly: true));
    }

    static double Median(IEnumerable<double> values)
    {
        var sorted = values.OrderBy(v => v).ToArray();
        return sorted[sorted.Length / 2];
    }
}
