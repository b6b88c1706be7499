using System.Diagnostics;
using LoraSharp.Adapters;
using LoraSharp.Models.Llama;
using LoraSharp.Tests.Infrastructure;
using LoraSharp.Training.Llm;
using TorchSharp;
using static TorchSharp.torch;
using Xunit.Abstractions;

namespace LoraSharp.Tests.Training.LlmTraining;

[Collection(TorchGlobalStateCollection.Name)]
public class LlmTrainerTests(ITestOutputHelper output)
{
    static string WriteData(TempDir dir)
    {
        var rows = Enumerable.Range(0, 12).Select(k => new { instruction = $"Say the word number {k}.", input = "", output = $"word {k * 7 % 10}" });
        LlmTestModels.WriteJsonl(dir.File("data.jsonl"), rows);
        return dir.File("data.jsonl");
    }

    static string Yaml(string extra, string adapter = "lora") => $"""
        base_model: {LlmTestModels.ReferenceModel}
        datasets:
          - path: data.jsonl
            type: alpaca
        sequence_len: 96
        sample_packing: true
        adapter: {adapter}
        lora_r: 4
        lora_alpha: 8
        lora_dropout: 0.1
        lora_target_modules: [q_proj, v_proj, down_proj]
        micro_batch_size: 2
        gradient_accumulation_steps: 2
        learning_rate: 0.005
        lr_scheduler: cosine
        warmup_steps: 2
        seed: 7
        output_dir: out
        {extra}
        """;

    /// <summary>Tiny models run faster on one libtorch thread (no OpenMP spinning on a shared 2-core machine).</summary>
    sealed class OneThread : IDisposable
    {
        readonly int _saved = torch.get_num_threads();
        public OneThread() => torch.set_num_threads(1);
        public void Dispose() => torch.set_num_threads(_saved);
    }

    static LlmTrainer Trainer(TempDir dir, string yaml, string name = "config.yaml")
    {
        File.WriteAllText(dir.File(name), yaml);
        return new LlmTrainer(LlmTrainConfig.Load(dir.File(name)), new LlmTrainerOptions { WritePlot = false });
    }

    static Dictionary<string, byte[]> AdapterBytes(LlmTrainer t) =>
        t.TrainableParameters.ToDictionary(p => p.Name, p => p.Param.detach().contiguous().bytes.ToArray());

    [Theory]
    [InlineData("optimizer: adamw_torch")]
    [InlineData("optimizer: adamw_8bit")]
    public void Twenty_steps_equal_ten_then_resume_then_ten_bit_for_bit(string optimizer)
    {
        using var oneThread = new OneThread();
        using var dir = new TempDir();
        WriteData(dir);
        var yaml = Yaml(optimizer + "\nmax_steps: 20\nsave_steps: 10\nval_set_size: 2\neval_steps: 10");
        Dictionary<string, byte[]> straight;
        using (var t = Trainer(dir, yaml.Replace("output_dir: out", "output_dir: straight")))
        {
            t.Train();
            straight = AdapterBytes(t);
        }
        using (var t = Trainer(dir, yaml.Replace("output_dir: out", "output_dir: split")))
        {
            var first = new LlmTrainer(t.Config, new LlmTrainerOptions { StopAfterSteps = 10, WritePlot = false });
            first.Train();
            first.Dispose();
            Assert.True(Directory.Exists(dir.File("split/checkpoint-10")));
            Assert.False(File.Exists(dir.File("split/adapter_model.safetensors")), "an interrupted run writes no final adapter");
            var r = t.Train(resumeFrom: "latest");
            Assert.Equal(20, r.Steps);
            Assert.Equal(20, r.LossHistory.Count);
            var resumed = AdapterBytes(t);
            Assert.Equal(straight.Keys.Order(), resumed.Keys.Order());
            foreach (var (k, v) in straight) Assert.True(v.AsSpan().SequenceEqual(resumed[k]), $"{k} differs after resume");
        }
    }

    [Fact]
    public void Gradient_checkpointing_gives_the_same_gradients_as_the_plain_graph_with_dropout()
    {
        using var model = LlamaCheckpoint.Load(LlmTestModels.ReferenceModel);
        using var host = new AdapterHost(model);
        host.FreezeBase();
        torch.manual_seed(1);
        host.Create("a", new AdapterConfig { Rank = 4, Alpha = 4, Dropout = new AdapterDropout { Input = 0.3 } }, ModuleSelector.Suffix("q_proj", "o_proj", "up_proj"));
        using (torch.no_grad()) foreach (var p in host.TrainableParameters()) p.normal_(0, 0.1);
        model.train();
        var grads = new List<float[][]>();
        foreach (var ckpt in new[] { false, true })
        {
            LlmGradientCheckpoint.Set(model, ckpt);
            foreach (var p in host.TrainableParameters()) p.grad?.zero_();
            torch.manual_seed(42);
            using var scope = NewDisposeScope();
            var ids = torch.tensor(new long[] { 1, 17, 42, 99, 200, 3, 7, 128, 1, 88, 5, 231, 64, 12, 150, 33 }, [2, 8]);
            model.Logits(ids).log_softmax(-1).mean().backward();
            grads.Add(host.TrainableParameters().Select(p => p.grad!.data<float>().ToArray()).ToArray());
        }
        LlmGradientCheckpoint.Set(model, false);
        for (int i = 0; i < grads[0].Length; i++) Assert.Equal(grads[0][i], grads[1][i]);
        Assert.Contains(grads[0], g => g.Any(v => v != 0));
    }

    [Fact]
    public void Packed_rows_give_each_sample_the_logits_it_has_alone()
    {
        using var model = LlamaCheckpoint.Load(LlmTestModels.ReferenceModel);
        var a = new LoraSharp.Training.Llm.LlmSample([1, 17, 42, 99, 200], [1, 17, 42, 99, 200]);
        var b = new LoraSharp.Training.Llm.LlmSample([1, 88, 5, 231], [-100, -100, 5, 231]);
        var rows = LlmData.Pack([a, b], 12, 0);
        Assert.Single(rows);
        Assert.Equal([0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2], rows[0].PositionIds);
        Assert.Equal(-100, rows[0].Labels[5]); // no loss across the sample boundary
        using var batch = LlmData.Collate(rows, 0, packed: true, torch.CPU);
        using var noGrad = torch.no_grad();
        using var packed = model.Logits(batch.InputIds, null, false, batch.PositionIds, batch.AttentionMask);
        foreach (var (s, offset) in new[] { (a, 0), (b, 5) })
        {
            using var alone = model.Logits(torch.tensor(s.InputIds.Select(x => (long)x).ToArray(), [1, s.InputIds.Length]));
            using var part = packed.narrow(1, offset, s.InputIds.Length);
            Assert.True(torch.allclose(alone, part, 1e-5, 1e-5), $"sample at {offset}: max diff {(alone - part).abs().max().item<float>()}");
        }
    }

    [Fact]
    public void Qlora_with_bf16_8bit_adam_and_checkpointing_lowers_the_loss_and_writes_a_peft_adapter()
    {
        using var oneThread = new OneThread();
        using var dir = new TempDir();
        WriteData(dir);
        using var t = Trainer(dir, Yaml("max_steps: 16\ngradient_checkpointing: true\nbf16: true\noptimizer: adamw_8bit\nlora_target_linear: true", "qlora")
            .Replace("lora_target_modules: [q_proj, v_proj, down_proj]\n", ""));
        var r = t.Train();
        double first = r.LossHistory.Take(3).Average(h => h.Loss), last = r.LossHistory.TakeLast(3).Average(h => h.Loss);
        output.WriteLine($"QLoRA loss {first:F3} → {last:F3}");
        Assert.True(last < first * 0.8, $"loss {first} → {last}");
        Assert.True(File.Exists(dir.File("out/adapter_model.safetensors")));
        Assert.True(LlmTrainer.WasTrainedOnNf4(dir.File("out")));
        using var read = LoraSharp.Formats.AdapterFile.Read(dir.File("out"));
        Assert.Equal(14, read.Weights.Modules.Count);
        Assert.Contains(read.Weights.Modules, m => m.ModulePath == "model.layers.1.mlp.down_proj");
    }

    [Fact]
    public void Many_training_steps_keep_memory_flat()
    {
        using var oneThread = new OneThread();
        using var dir = new TempDir();
        WriteData(dir);
        using var t = Trainer(dir, Yaml("max_steps: 120\nsample_packing: false").Replace("sample_packing: true\n", ""));
        var samples = new List<(long Step, long Rss)>();
        t.Progress += p => { if (p.Step % 10 == 0) { GC.Collect(); GC.WaitForPendingFinalizers(); samples.Add((p.Step, Environment.WorkingSet)); } };
        t.Train();
        long early = samples.Where(s => s.Step is >= 20 and <= 40).Max(s => s.Rss), late = samples.Where(s => s.Step >= 100).Max(s => s.Rss);
        output.WriteLine(string.Join(", ", samples.Select(s => $"{s.Step}:{s.Rss / 1e6:F0}MB")));
        Assert.True(late - early < 30_000_000, $"RSS grew {(late - early) / 1e6:F1} MB between steps 40 and 120");
    }

    [Fact]
    public void Merge_adapter_writes_a_loadable_model_equal_to_the_unmerged_forward()
    {
        using var dir = new TempDir();
        WriteData(dir);
        using (var t = Trainer(dir, Yaml("max_steps: 4"))) t.Train();
        var report = LlmMerge.Merge(LlmTestModels.ReferenceModel, [(dir.File("out"), 1.0)], dir.File("merged"), quantizationReport: true);
        Assert.True(report.MaxAbsDelta > 0);
        Assert.True(report.MaxQuantizationDifference is > 0 and < 0.1);
        using var merged = LlamaCheckpoint.Load(dir.File("merged"));
        using var base_ = LlamaCheckpoint.Load(LlmTestModels.ReferenceModel);
        using var host = LlmAdapters.Attach(base_, [(dir.File("out"), 1.0)]);
        using var ids = torch.tensor(new long[] { 1, 17, 42, 99, 200, 3, 7, 128 }, [1, 8]);
        using var noGrad = torch.no_grad();
        using var a = merged.Logits(ids);
        using var b = base_.Logits(ids);
        Assert.True(torch.allclose(a, b, 1e-4, 1e-4));
    }
}
