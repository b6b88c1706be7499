using System.Diagnostics;
using System.Globalization;
using System.Text.Json;
using LoraSharp.Models.Llama;
using LoraSharp.Training.Llm;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Bench;

/// <summary>
/// Training step time, tokens/s and peak RSS of full fine-tuning, LoRA (r=16, all linears) and QLoRA (NF4 base, r=16)
/// on a generated ~110M-parameter Llama (hidden 768, 12 layers, MLP 2048, vocab 32000, tied embeddings), float32,
/// micro-batch 1 × 256 tokens, AdamW. Each mode runs in its own child process so its peak RSS (VmHWM) is its own.
/// Options: --steps N (timed steps after one warm-up step, default 3), --seq N (default 256), --bf16.
/// </summary>
public static class LlmTrainBenchmark
{
    public static int Run(string[] args)
    {
        int steps = 3, seq = 256;
        bool bf16 = false, child = false;
        string? mode = null, dir = null;
        for (int i = 0; i < args.Length; i++)
        {
            switch (args[i])
            {
                case "--steps": steps = int.Parse(args[++i], CultureInfo.InvariantCulture); break;
                case "--seq": seq = int.Parse(args[++i], CultureInfo.InvariantCulture); break;
                case "--bf16": bf16 = true; break;
                case "--child": child = true; mode = args[++i]; dir = args[++i]; break;
                default: Console.Error.WriteLine($"unknown option {args[i]} (--steps N, --seq N, --bf16)"); return 2;
            }
        }
        if (child) return Child(mode!, dir!, steps, seq, bf16);

        var work = Directory.CreateTempSubdirectory("lorasharp-llm-bench-").FullName;
        try
        {
            var model = MakeModel(Path.Combine(work, "model"));
            var results = new Dictionary<string, JsonElement>();
            foreach (var m in new[] { "full", "lora", "qlora" })
            {
                var psi = new ProcessStartInfo(Environment.ProcessPath!) { RedirectStandardOutput = true, UseShellExecute = false };
                if (Path.GetFileNameWithoutExtension(Environment.ProcessPath) == "dotnet") psi.ArgumentList.Add(Environment.GetCommandLineArgs()[0]); // the dll
                foreach (var a in new[] { "llm-train", "--child", m, work, "--steps", steps.ToString(CultureInfo.InvariantCulture), "--seq", seq.ToString(CultureInfo.InvariantCulture) })
                    psi.ArgumentList.Add(a);
                if (bf16) psi.ArgumentList.Add("--bf16");
                using var p = Process.Start(psi)!;
                string? last = null;
                while (p.StandardOutput.ReadLine() is { } line) { Console.WriteLine("  " + line); if (line.StartsWith('{')) last = line; }
                p.WaitForExit();
                if (p.ExitCode != 0 || last is null) { Console.Error.WriteLine($"{m}: child failed ({p.ExitCode})"); return 1; }
                results[m] = JsonDocument.Parse(last).RootElement.Clone();
            }
            Console.WriteLine();
            Console.WriteLine($"model {model / 1e6:F0}M parameters, {seq} tokens per step, {(bf16 ? "bf16" : "fp32")}, {get_num_threads()} threads");
            Console.WriteLine($"{"mode",-6} {"step s",8} {"tokens/s",9} {"peak RSS MB",12} {"trainable",12} {"base weights MB",16}");
            foreach (var (m, r) in results)
                Console.WriteLine($"{m,-6} {r.GetProperty("step_seconds").GetDouble(),8:F2} {r.GetProperty("tokens_per_second").GetDouble(),9:F0} {r.GetProperty("peak_rss_mb").GetDouble(),12:F0} {r.GetProperty("trainable").GetInt64(),12:N0} {r.GetProperty("weight_mb").GetDouble(),16:F0}");
            double full = results["full"].GetProperty("step_seconds").GetDouble();
            Console.WriteLine($"step time LoRA / full = {results["lora"].GetProperty("step_seconds").GetDouble() / full:F2}, QLoRA / full = {results["qlora"].GetProperty("step_seconds").GetDouble() / full:F2}");
            return 0;
        }
        finally
        {
            try { Directory.Delete(work, true); } catch (IOException) { }
        }
    }

    static long MakeModel(string folder)
    {
        Directory.CreateDirectory(folder);
        File.WriteAllText(Path.Combine(folder, "config.json"), """
            { "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 32000, "hidden_size": 768,
              "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 12, "num_key_value_heads": 4,
              "max_position_embeddings": 2048, "tie_word_embeddings": true, "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2 }
            """);
        // Any tokenizer works for random data: take the repository's reference one when present.
        var tok = FindReferenceTokenizer() ?? throw new InvalidOperationException("reference tokenizer.model not found (set LORASHARP_REFERENCE_DIR)");
        File.Copy(tok, Path.Combine(folder, "tokenizer.model"));
        var config = LlamaConfig.Load(folder);
        using var model = new LlamaForCausalLM(config, ScalarType.Float32, CPU, WeightInit.Random, 0.02, new Generator(0));
        LlamaCheckpoint.SaveWeights(model, Path.Combine(folder, "model.safetensors"));
        return config.ParameterCount();
    }

    static string? FindReferenceTokenizer()
    {
        var env = Environment.GetEnvironmentVariable("LORASHARP_REFERENCE_DIR");
        var roots = new List<string>();
        if (!string.IsNullOrEmpty(env)) roots.Add(env);
        for (var d = new DirectoryInfo(AppContext.BaseDirectory); d is not null; d = d.Parent) roots.Add(Path.Combine(d.FullName, "shared", "reference"));
        return roots.Select(r => Path.Combine(r, "llm", "model", "tokenizer.model")).FirstOrDefault(File.Exists);
    }

    static int Child(string mode, string work, int steps, int seq, bool bf16)
    {
        var dataDir = Path.Combine(work, "run-" + mode);
        Directory.CreateDirectory(dataDir);
        var rng = new Random(1);
        // Completion lines of random lowercase words: ~seq tokens each with the 256-piece tokenizer.
        var lines = Enumerable.Range(0, steps + 2).Select(_ => JsonSerializer.Serialize(new
        {
            text = string.Join(' ', Enumerable.Range(0, seq / 4).Select(_ => new string(Enumerable.Range(0, 3).Select(_ => (char)('a' + rng.Next(26))).ToArray()))),
        }));
        File.WriteAllLines(Path.Combine(dataDir, "data.jsonl"), lines);
        var adapter = mode == "full" ? "" : mode;
        File.WriteAllText(Path.Combine(dataDir, "config.yaml"), $"""
            base_model: {Path.Combine(work, "model")}
            datasets:
              - path: data.jsonl
                type: completion
            sequence_len: {seq * 2}
            adapter: {adapter}
            lora_r: 16
            lora_alpha: 16
            lora_dropout: 0.0
            lora_target_linear: true
            micro_batch_size: 1
            max_steps: {steps + 1}
            learning_rate: 0.0001
            lr_scheduler: constant
            optimizer: adamw_torch
            bf16: {(bf16 ? "true" : "false")}
            seed: 1
            output_dir: out
            """);
        var config = LlmTrainConfig.Load(Path.Combine(dataDir, "config.yaml"));
        using var trainer = new LlmTrainer(config, new LlmTrainerOptions { WritePlot = false });
        var times = new List<double>();
        var tokens = new List<long>();
        var clock = Stopwatch.StartNew();
        trainer.Progress += p =>
        {
            times.Add(clock.Elapsed.TotalSeconds);
            clock.Restart();
            Console.WriteLine($"{mode}: step {p.Step} {times[^1]:F2}s loss {p.Loss:F3}");
        };
        trainer.Train();
        int tokensPerStep = trainer.MicroBatchesOf(1).Sum(m => m.Sum(r => r.Length));
        double stepSeconds = times.Skip(1).Average();
        var result = new
        {
            mode,
            step_seconds = stepSeconds,
            tokens_per_second = tokensPerStep / stepSeconds,
            peak_rss_mb = PeakRssMb(),
            trainable = trainer.TrainableParameters.Sum(p => p.Param.numel()),
            weight_mb = trainer.Base.WeightBytes / 1e6,
        };
        Console.WriteLine(JsonSerializer.Serialize(result));
        return 0;
    }

    static double PeakRssMb()
    {
        foreach (var line in File.ReadLines("/proc/self/status"))
            if (line.StartsWith("VmHWM:", StringComparison.Ordinal))
                return long.Parse(line.Split(' ', StringSplitOptions.RemoveEmptyEntries)[1], CultureInfo.InvariantCulture) / 1024.0;
        return double.NaN;
    }
}
