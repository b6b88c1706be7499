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

            // Base vs the same model with an unmerged LoRA r=16 on every decoder Linear (forward hooks), interleaved rep by
            // rep so drift and warm-up hit both sides alike; the adapter is attached and removed around each LoRA rep.
            var basePre = new List<double>(); var loraPre = new List<double>(); var baseDec = new List<double>(); var loraDec = new List<double>();
            for (int rep = 0; rep < runs; rep++)
            {
                basePre.Add(Prefill(model, prompt));
                baseDec.Add(Decode(model, prompt, newTokens));
                using var host = new LoraSharp.Adapters.AdapterHost(model);
                host.Create("bench", new LoraSharp.Adapters.AdapterConfig { Rank = 16, Alpha = 16, DType = dtype },
                    LoraSharp.Adapters.ModuleSelector.Regex(@"^model\.layers\..*"));
                if (rep == 0) Prefill(model, prompt); // warm-up with hooks
                loraPre.Add(Prefill(model, prompt));
                loraDec.Add(Decode(model, prompt, newTokens));
            }
            double bp = Median(basePre), lp = Median(loraPre), bd = Median(baseDec), ld = Median(loraDec);
            Console.WriteLine($"{dtype,-9} LoRA r=16 unmerged vs base (interleaved): prefill {promptLength / lp,8:F0} vs {promptLength / bp:F0} tokens/s (time ratio {lp / bp:F2})   " +
                              $"decode {newTokens / ld,6:F1} vs {newTokens / bd:F1} tokens/s (time ratio {ld / bd:F2})");
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
    /// The same Linear layers alone (x @ Wᵀ for every weight, <paramref name="tokens"/> rows (lm_head: one), <paramref name="repeats"/> times):
    /// the matmul work a forward cannot avoid, measured in the same run so the ratio survives a busy machine.
    /// </summary>
    static double MatmulFloor(LlamaForCausalLM model, int tokens, int repeats)
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        // lm_head sees one row per step (Logits(lastOnly: true)); every other Linear sees all the tokens.
        var linears = model.LinearModules();
        var weights = linears.Select(m => m.Module.weight!).ToList();
        var inputs = linears.Select(m => randn([1, m.Path == "lm_head" ? 1 : tokens, m.Module.weight!.shape[1]], dtype: m.Module.weight!.dtype)).ToList();
        var watch = Stopwatch.StartNew();
        for (int r = 0; r < repeats; r++)
            for (int i = 0; i < weights.Count; i++)
                nn.functional.linear(inputs[i], weights[i]).Dispose();
        return watch.Elapsed.TotalSeconds;
    }

    /// <summary>Per-module times of one forward step (bfloat16, 128 positions, no cache): where time goes.</summary>
    static void Profile()
    {
        var config = LlamaConfig.Parse("""{ "vocab_size": 32000, "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 12, "num_key_value_heads": 4, "tie_word_embeddings": true }""");
        foreach (var dtype in new[] { ScalarType.Float32, ScalarType.BFloat16 })
        {
            using var model = new LlamaForCausalLM(config, dtype, CPU, WeightInit.Random);
            using var noGrad = no_grad();
            using var scope = NewDisposeScope();
            const int seq = 128;
            var x = randn([1, seq, 768], dtype: dtype);
            var ids = randint(0, 32000, [1, seq], dtype: ScalarType.Int64);
            void Time(string name, Action a)
            {
                a();
                var w = Stopwatch.StartNew();
                for (int i = 0; i < 5; i++) using (NewDisposeScope()) a();
                Console.WriteLine($"{dtype,-9} {name,-22} {w.Elapsed.TotalMilliseconds / 5,8:F2} ms");
            }
            var (cos, sin) = model.Model.Rotary.CosSin(0, seq, dtype, CPU);
            var ctx = new LlamaForwardContext { Cos = cos, Sin = sin };
            var layer = model.Model.Layers[0];
            var q = randn([1, 12, seq, 64], dtype: dtype);
            Time("input_layernorm", () => layer.InputLayerNorm.call(x));
            Time("self_attn", () => layer.SelfAttention.call(x, ctx));
            Time("  q/k/v/o proj", () => { layer.SelfAttention.QProj.call(x); layer.SelfAttention.KProj.call(x); layer.SelfAttention.VProj.call(x); layer.SelfAttention.OProj.call(x); });
            Time("  rope (q)", () => RotaryEmbedding.Apply(q, cos, sin));
            Time("  sdpa causal", () => nn.functional.scaled_dot_product_attention(q, q, q, is_casual: true));
            Time("mlp", () => layer.Mlp.call(x));
            Time("decoder layer", () => layer.call(x, ctx));
            var x1 = randn([1, 1, 768], dtype: dtype);
            Time("lm_head (fresh x)", () => model.LmHead.call(x1));
            Time("lm_head (last)", () => model.LmHead.call(x.narrow(1, seq - 1, 1)));
            Time("lm_head (last, copy)", () => model.LmHead.call(x.narrow(1, seq - 1, 1).contiguous().clone()));
            Time("lm_head (fresh x)", () => model.LmHead.call(x1));
            var x2 = x.narrow(1, seq - 1, 1).clone();
            Console.WriteLine($"x1 {x1.abs().max().to_type(ScalarType.Float32).item<float>()} x2 {x2.abs().max().to_type(ScalarType.Float32).item<float>()} strides {string.Join(",", x2.stride())}");
            Time("linear 2D", () => nn.functional.linear(x1.view(1, 768), model.LmHead.weight!));
            Time("matmul W^T", () => x1.view(1, 768).matmul(model.LmHead.weight!.t()));
            Time("mv", () => model.LmHead.weight!.mv(x1.view(768)));
            Time("whole forward (last)", () => model.Logits(ids, null, lastOnly: true));
        }
    }

    static double Median(IEnumerable<double> values)
    {
        var sorted = values.OrderBy(v => v).ToArray();
        return sorted[sorted.Length / 2];
    }
}
