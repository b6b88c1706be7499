using System.Text.Json.Nodes;
using LoraSharp.Demo;
using LoraSharp.Models.Llama;
using LoraSharp.Tests.Infrastructure;
using LoraSharp.Text;
using Xunit.Abstractions;
using static TorchSharp.torch;

namespace LoraSharp.Tests.Demo;

/// <summary>The generated text tasks and the demo tokenizer (no model needed).</summary>
public class TextTasksTests
{
    [Fact]
    public void Pretraining_corpus_is_a_pure_function_of_the_seed_and_never_contains_the_held_out_task()
    {
        var a = TextTasks.Pretraining(2000, seed: 3);
        var b = TextTasks.Pretraining(2000, seed: 3);
        var c = TextTasks.Pretraining(2000, seed: 4);
        Assert.Equal(a, b);
        Assert.NotEqual(a, c);
        Assert.Equal(TextTasks.PretrainingTasks.Order(), a.Select(e => e.Task).Distinct().Order());
        Assert.DoesNotContain(a, e => e.Task == TextTasks.HeldOutTask || e.Prompt.Contains(TextTasks.HeldOutTask, StringComparison.Ordinal));
        // Answers follow the task definitions.
        foreach (var e in a)
        {
            var words = e.Prompt[(e.Prompt.IndexOf(':') + 2)..].Split(' ');
            switch (e.Task)
            {
                case "copy": Assert.Equal(string.Join(' ', words), e.Answer); break;
                case "first": Assert.Equal(words[0], e.Answer); break;
                case "last": Assert.Equal(words[^1], e.Answer); break;
                case "count": Assert.Equal(words.Length.ToString(), e.Answer); break;
                case "after": Assert.Equal((int.Parse(words[0]) + 1).ToString(), e.Answer); break;
                case "before": Assert.Equal((int.Parse(words[0]) - 1).ToString(), e.Answer); break;
                case "add": Assert.Equal((int.Parse(words[0]) + int.Parse(words[1])).ToString(), e.Answer); break;
            }
        }
    }

    [Fact]
    public void Held_out_examples_swap_two_different_words_and_evaluation_prompts_avoid_the_training_prompts()
    {
        var train = TextTasks.Distinct(TextTasks.HeldOutTask, 300, seed: 7);
        var eval = TextTasks.Distinct(TextTasks.HeldOutTask, 50, seed: 8, train.Select(e => e.Prompt));
        Assert.Equal(300, train.Select(e => e.Prompt).Distinct().Count());
        Assert.Empty(eval.Select(e => e.Prompt).Intersect(train.Select(e => e.Prompt)));
        foreach (var e in train.Concat(eval))
        {
            var words = e.Prompt["swap: ".Length..].Split(' ');
            Assert.Equal(2, words.Length);
            Assert.Equal(words.Length, words.Distinct().Count());
            Assert.Equal(string.Join(' ', words.Reverse()), e.Answer);
            Assert.NotEqual(string.Join(' ', words), e.Answer); // copying is never right
        }
        Assert.Equal(train, TextTasks.Distinct(TextTasks.HeldOutTask, 300, seed: 7));
    }

    [Fact]
    public void Chat_jsonl_round_trips()
    {
        using var dir = new TempDir();
        var examples = TextTasks.Pretraining(50, seed: 1);
        TextTasks.WriteJsonl(dir.File("x.jsonl"), examples);
        Assert.Equal(examples, TextTasks.ReadJsonl(dir.File("x.jsonl")));
        File.WriteAllText(dir.File("bad.jsonl"), "{\"messages\": []}\n");
        var e = Assert.Throws<LoraSharpException>(() => TextTasks.ReadJsonl(dir.File("bad.jsonl")));
        Assert.Contains("bad.jsonl", e.Message);
    }

    [Fact]
    public void Demo_tokenizer_makes_every_task_word_one_token_reads_the_chat_template_and_round_trips_text()
    {
        using var dir = new TempDir();
        int vocab = DemoLlm.WriteTokenizer(dir.Path);
        var tok = LlmTokenizer.Load(dir.Path);
        Assert.Equal(vocab, tok.Tokenizer.VocabSize);
        foreach (var w in TextTasks.Vocabulary())
        {
            Assert.Single(tok.Tokenizer.Encode(w));
            Assert.Single(tok.Tokenizer.Encode(" " + w));
        }
        Assert.Equal(ChatFormat.ChatML, tok.ChatFormat);
        Assert.Null(tok.BosId);
        Assert.Equal(tok.Tokenizer.TokenToId(DemoLlm.ImEnd), tok.EosId);
        Assert.Contains(tok.Tokenizer.TokenToId(DemoLlm.ImEnd)!.Value, tok.StopTokenIds);
        var chat = tok.EncodeChat([ChatMessage.User("copy: cat owl")], addGenerationPrompt: true);
        Assert.Equal("<|im_start|>user\ncopy: cat owl<|im_end|>\n<|im_start|>assistant\n", tok.Decode(chat, skipSpecialTokens: false));
        Assert.Equal(12, chat.Count); // im_start user \n copy : ␣cat ␣owl im_end \n im_start assistant \n
        // Text outside the vocabulary still tokenizes (byte symbols) and decodes back exactly.
        foreach (var text in new[] { "reverse: fox owl", "swap: cat dog", "Ünïcödé ✓ 12345", "tab\tand\nnewline" })
            Assert.Equal(text, tok.Decode(tok.Tokenizer.Encode(text)));
        // The same words give the same file: the tokenizer is a pure function of the generator.
        using var dir2 = new TempDir();
        DemoLlm.WriteTokenizer(dir2.Path);
        Assert.Equal(File.ReadAllText(dir.File("tokenizer.json")), File.ReadAllText(dir2.File("tokenizer.json")));
    }
}

/// <summary>The committed demo language model, its pretraining path and the quickstart (they set libtorch's thread count).</summary>
[Collection("Demo quickstart")]
public class QuickstartLlmTests(ITestOutputHelper output)
{
    static string ModelDir => Path.Combine(QuickstartLlm.FindRoot(), "models", "demo", "llm");

    static T OneThread<T>(Func<T> f)
    {
        int threads = get_num_threads();
        set_num_threads(1);
        try { return f(); }
        finally { set_num_threads(threads); }
    }

    [Fact]
    public void Committed_demo_llm_loads_and_its_config_and_tokenizer_are_what_the_generator_writes()
    {
        var dir = ModelDir;
        var config = LlamaConfig.Load(dir);
        var a = new DemoLlmArchitecture();
        Assert.Equal(("llama", a.HiddenSize, a.Layers, a.Heads, a.KeyValueHeads, a.IntermediateSize, true),
            (config.ModelType, config.HiddenSize, config.NumHiddenLayers, config.NumAttentionHeads, config.NumKeyValueHeads, config.IntermediateSize, config.TieWordEmbeddings));
        long bytes = Directory.GetFiles(dir, "*", SearchOption.AllDirectories).Sum(f => new FileInfo(f).Length);
        Assert.True(bytes < 25_000_000, $"models/demo/llm is {bytes / 1e6:F1} MB");

        // Tokenizer and config are exactly what the generator writes today (reproducible).
        using var fresh = new TempDir();
        DemoLlm.WriteTokenizer(fresh.Path);
        Assert.Equal(File.ReadAllText(fresh.File("tokenizer.json")), File.ReadAllText(Path.Combine(dir, "tokenizer.json")));
        Assert.Equal(File.ReadAllText(fresh.File("tokenizer_config.json")), File.ReadAllText(Path.Combine(dir, "tokenizer_config.json")));
        var tok = LlmTokenizer.Load(dir);
        var expected = DemoLlm.ConfigJson(a, tok.Tokenizer.VocabSize, tok.EosId!.Value, tok.PadId!.Value);
        Assert.True(JsonNode.DeepEquals(expected, JsonNode.Parse(File.ReadAllText(Path.Combine(dir, "config.json")))), "config.json differs from DemoLlm.ConfigJson");
        Assert.Equal(tok.Tokenizer.VocabSize, config.VocabSize);

        // Every tensor present with the right shape (strict load), and the weights are trained, not the seed's init.
        using var model = LlamaCheckpoint.Load(dir, out var report);
        Assert.True(report.IsComplete, report.ToString());
        using var gen = new TorchSharp.torch.Generator(1);
        using var init = new LlamaForCausalLM(config, init: WeightInit.Random, initStd: 0.02, generator: gen);
        using var w = model.Model.EmbedTokens.weight!.detach();
        using var w0 = init.Model.EmbedTokens.weight!.detach();
        using var diff = w.sub(w0).abs().max();
        Assert.True(diff.item<float>() > 0.05, "the committed weights equal the random init");
    }

    [Fact]
    public void Committed_demo_llm_does_its_pretraining_tasks_and_cannot_swap()
    {
        var accuracy = OneThread(() => DemoLlm.TaskAccuracy(ModelDir, perTask: 20, seed: 4242));
        foreach (var (task, acc) in accuracy) output.WriteLine($"{task}: {acc:P0}");
        double mean = accuracy.Values.Average();
        Assert.True(mean >= 0.8, $"mean exact match over the pretraining tasks is {mean:P0}");
        // Copying more than two words is the one task the model has not learned (docs/quickstart.md); the others are solved.
        Assert.True(accuracy.Count(kv => kv.Value >= 0.9) >= 9, "fewer than 9 of the 10 tasks at ≥ 90 %");

        var swap = TextTasks.Distinct(TextTasks.HeldOutTask, 20, seed: 4243);
        using var model = LlamaCheckpoint.Load(ModelDir);
        var report = OneThread(() => ExactMatch.Evaluate(model, LlmTokenizer.Load(ModelDir), swap));
        output.WriteLine($"swap: {report.Rate:P0}, e.g. '{report.Rows[0].Prompt}' → '{report.Rows[0].Output}'");
        Assert.True(report.Rate <= 0.2, $"the base model already swaps ({report.Rate:P0})");
    }

    [Fact]
    public void Init_folder_and_short_pretraining_are_reproducible_from_the_seed_and_train_all_parameters()
    {
        using var dir = new TempDir();
        var o = new DemoLlmPretrainOptions { Seed = 5, Examples = 400, Steps = 12, BatchSize = 16, EvalExamples = 16, WarmupSteps = 2 };
        var r1 = OneThread(() => DemoLlm.Pretrain(dir.File("a"), o with { WorkDir = dir.File("wa") }));
        var r2 = OneThread(() => DemoLlm.Pretrain(dir.File("b"), o with { WorkDir = dir.File("wb") }));
        output.WriteLine($"loss {r1.FirstLoss:F3} → {r1.FinalLoss:F3} in {r1.TrainTime.TotalSeconds:F1}s");
        Assert.Equal(File.ReadAllBytes(Path.Combine(dir.File("wa"), "init", "model.safetensors")), File.ReadAllBytes(Path.Combine(dir.File("wb"), "init", "model.safetensors")));
        Assert.Equal(File.ReadAllLines(Path.Combine(dir.File("wa"), "pretrain.jsonl")), File.ReadAllLines(Path.Combine(dir.File("wb"), "pretrain.jsonl")));
        Assert.Equal(12, r1.Steps);
        Assert.Equal(r1.FinalLoss, r2.FinalLoss);
        Assert.True(r1.FinalLoss < r1.FirstLoss, "loss decreased");
        Assert.DoesNotContain(File.ReadAllLines(Path.Combine(dir.File("wa"), "pretrain.yaml")), l => l.StartsWith("adapter:", StringComparison.Ordinal));
        foreach (var f in new[] { "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json", "pretrain_loss.png", "pretraining.json" })
            Assert.True(File.Exists(Path.Combine(dir.File("a"), f)), f);
        // Full-parameter training: every tensor moved away from the init.
        using var init = LlamaCheckpoint.Load(Path.Combine(dir.File("wa"), "init"));
        using var trained = LlamaCheckpoint.Load(dir.File("a"));
        var before = init.named_parameters().ToDictionary(p => p.name, p => p.parameter);
        foreach (var (name, p) in trained.named_parameters())
        {
            using var d = p.detach().sub(before[name].detach()).abs().max();
            Assert.True(d.item<float>() > 0, $"{name} did not change");
        }
    }

    [Fact]
    public void Quickstart_llm_lora_raises_held_out_exact_match_from_near_zero_to_a_majority()
    {
        using var dir = new TempDir();
        var r = OneThread(() => new QuickstartLlm(new QuickstartLlmOptions { Root = QuickstartLlm.FindRoot(), OutputDir = dir.File("out"), MaxSteps = 150, EvalCount = 30 }, output.WriteLine).Run());
        output.WriteLine($"base {r.Base.Rate:P0}, LoRA {r.Lora.Rate:P0}; {r.Steps} steps in {r.TrainTime.TotalSeconds:0} s, eval {r.EvalTime.TotalSeconds:0} s");
        foreach (var (b, l) in r.Base.Rows.Zip(r.Lora.Rows).Take(5)) output.WriteLine($"{b.Prompt} | base: {b.Output} | LoRA: {l.Output}");
        Assert.Equal(30, r.Base.Rows.Count);
        Assert.True(r.Base.Rate <= 0.2, $"base exact match {r.Base.Rate:P0}");
        Assert.True(r.Lora.Rate >= 0.6, $"LoRA exact match {r.Lora.Rate:P0}");
        Assert.True(File.Exists(Path.Combine(r.AdapterPath, "adapter_model.safetensors")));
        Assert.True(File.Exists(Path.Combine(r.AdapterPath, "adapter_config.json")));
        Assert.NotNull(r.LossCurvePath);
        Assert.StartsWith(dir.Path, r.AdapterPath, StringComparison.Ordinal);
    }
}
