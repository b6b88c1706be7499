using System.Diagnostics;
using LoraSharp.Models.Llama;
using LoraSharp.Tests.Infrastructure;
using LoraSharp.Text;
using LoraSharp.Training.Llm;
using TorchSharp;
using Xunit.Abstractions;

namespace LoraSharp.Tests.Training.LlmTraining;

/// <summary>
/// Real learning: a tiny Llama is trained from scratch on a fixed question → answer mapping, then a LoRA (and a
/// QLoRA) adapter learns a shifted mapping; greedy exact-match accuracy must rise from ~0 to ≥ 90% with the base
/// weights unchanged.
/// </summary>
[Collection(TorchGlobalStateCollection.Name)]
public class LlmLearningTests(ITestOutputHelper output)
{
    static readonly string[] Words =
    [
        "red", "blue", "green", "black", "white", "gold", "gray", "pink", "brown", "cyan",
        "lime", "navy", "teal", "rose", "sand", "mint", "plum", "ruby", "jade", "onyx",
    ];

    static string Text(int k, int shift) => $"q{k} = {Words[(k + shift) % Words.Length]}";

    static string Config(string model, string data, string outDir, string adapter, int steps, double lr) => $"""
        base_model: {model}
        datasets:
          - path: {data}
            type: completion
        sequence_len: 32
        adapter: {adapter}
        lora_r: 16
        lora_alpha: 32
        lora_dropout: 0.0
        lora_target_linear: true
        micro_batch_size: 20
        gradient_accumulation_steps: 1
        max_steps: {steps}
        learning_rate: {lr}
        lr_scheduler: constant
        warmup_steps: 0
        optimizer: adamw_torch
        max_grad_norm: 1.0
        seed: 1
        output_dir: {outDir}
        """;

    /// <summary>Greedy exact match: the generated ids after "q{k} =" equal the tokens of the expected answer and EOS.</summary>
    static double Accuracy(LlamaForCausalLM model, LlmTokenizer tok, int shift)
    {
        model.eval();
        int hits = 0;
        for (int k = 0; k < Words.Length; k++)
        {
            var full = tok.Encode(Text(k, shift), addBos: true, addEos: true);
            var prompt = tok.Encode($"q{k} =", addBos: true, addEos: false);
            Assert.Equal(prompt, full.Take(prompt.Count));
            var expected = full.Skip(prompt.Count).ToList();
            var got = LlamaGenerator.GenerateAll(model, prompt, new GenerationOptions { MaxNewTokens = expected.Count });
            if (got.SequenceEqual(expected)) hits++;
        }
        return hits / (double)Words.Length;
    }

    [Fact]
    public void Lora_and_qlora_learn_a_shifted_mapping_on_a_model_trained_from_scratch_with_the_base_unchanged()
    {
        var clock = Stopwatch.StartNew();
        // A hidden-64 model gains nothing from threads, and on a shared 2-core machine OpenMP spinning costs a lot.
        int threads = torch.get_num_threads();
        torch.set_num_threads(1);
        try { Run(clock); }
        finally { torch.set_num_threads(threads); }
    }

    void Run(Stopwatch clock)
    {
        using var dir = new TempDir();
        var random = LlmTestModels.RandomModel(dir.File("random"), seed: 3);
        LlmTestModels.WriteJsonl(dir.File("base.jsonl"), Enumerable.Range(0, Words.Length).Select(k => new { text = Text(k, 0) }));
        LlmTestModels.WriteJsonl(dir.File("shift.jsonl"), Enumerable.Range(0, Words.Length).Select(k => new { text = Text(k, 7) }));

        // 1. Pre-train from scratch (full fine-tuning of random weights) on the base mapping.
        File.WriteAllText(dir.File("pretrain.yaml"), Config(random, "base.jsonl", "pretrained", "", 120, 5e-3));
        using (var pre = new LlmTrainer(LlmTrainConfig.Load(dir.File("pretrain.yaml")), new LlmTrainerOptions { WritePlot = false }))
        {
            var r = pre.Train();
            output.WriteLine($"pretrain: loss {r.LossHistory[0].Loss:F3} → {r.FinalLoss:F3} in {clock.Elapsed.TotalSeconds:F1}s");
            Assert.True(Accuracy(pre.Model, pre.Tokenizer, 0) >= 0.9, "the base mapping is learned");
        }
        var pretrained = dir.File("pretrained");

        foreach (var adapter in new[] { "lora", "qlora" })
        {
            File.WriteAllText(dir.File(adapter + ".yaml"), Config(pretrained, "shift.jsonl", adapter + "-out", adapter, 80, 1e-2));
            using var trainer = new LlmTrainer(LlmTrainConfig.Load(dir.File(adapter + ".yaml")), new LlmTrainerOptions { WritePlot = false });
            var baseSum = LlmTestModels.Checksum(trainer.Model);
            var nf4Before = trainer.Base.Quantized?.Paths.Select(p => Convert.ToHexString(System.Security.Cryptography.SHA256.HashData(trainer.Base.Quantized[p].Packed))).ToList();
            double before = Accuracy(trainer.Model, trainer.Tokenizer, 7);
            var result = trainer.Train();
            double after = Accuracy(trainer.Model, trainer.Tokenizer, 7);
            output.WriteLine($"{adapter}: shifted accuracy {before:P0} → {after:P0}, loss {result.LossHistory[0].Loss:F3} → {result.FinalLoss:F3}, t = {clock.Elapsed.TotalSeconds:F1}s");
            Assert.True(before <= 0.1, $"{adapter}: before training the shifted mapping is unknown ({before:P0})");
            Assert.True(after >= 0.9, $"{adapter}: after training the shifted accuracy is {after:P0}");

            // Base weights unchanged: every base parameter (and the NF4 store) hashes the same; the adapter did the work.
            trainer.Host!.Dispose();
            if (trainer.Base.Quantized is null) Assert.Equal(baseSum, LlmTestModels.Checksum(trainer.Model));
            else Assert.Equal(nf4Before, trainer.Base.Quantized.Paths.Select(p => Convert.ToHexString(System.Security.Cryptography.SHA256.HashData(trainer.Base.Quantized[p].Packed))).ToList());
            using var fresh = LlamaCheckpoint.Load(pretrained);
            if (trainer.Base.Quantized is null) Assert.Equal(LlmTestModels.Checksum(fresh), baseSum);

            // The written PEFT adapter reproduces the accuracy on a freshly loaded base.
            using var host = LlmAdapters.Attach(fresh, [(dir.File(adapter + "-out"), 1.0)]);
            double reloaded = Accuracy(fresh, trainer.Tokenizer, 7);
            Assert.True(reloaded >= (adapter == "lora" ? after - 1e-9 : 0.8), $"{adapter}: reloaded adapter accuracy {reloaded:P0}");
        }
        output.WriteLine($"total {clock.Elapsed.TotalSeconds:F1}s");
    }
}
