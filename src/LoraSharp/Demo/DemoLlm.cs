using System.Diagnostics;
using System.Globalization;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using System.Text.RegularExpressions;
using LoraSharp.Models.Llama;
using LoraSharp.Text;
using LoraSharp.Training.Llm;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Demo;

/// <summary>The shape of the demo language model (Llama architecture).</summary>
public sealed record DemoLlmArchitecture
{
    public int HiddenSize { get; init; } = 128;
    public int Layers { get; init; } = 4;
    public int Heads { get; init; } = 4;
    public int KeyValueHeads { get; init; } = 2;
    public int IntermediateSize { get; init; } = 384;
    public int MaxPositions { get; init; } = 128;
}

/// <summary>Settings of <see cref="DemoLlm.Pretrain"/> (the defaults made the committed model).</summary>
public sealed record DemoLlmPretrainOptions
{
    public int Seed { get; init; } = 1;
    /// <summary>Examples in the generated corpus (each a user turn and its answer).</summary>
    public int Examples { get; init; } = 40000;
    public int Steps { get; init; } = 3000;
    public int BatchSize { get; init; } = 64;
    public double LearningRate { get; init; } = 3e-3;
    public int WarmupSteps { get; init; } = 100;
    /// <summary>Held-out examples for the evaluation loss.</summary>
    public int EvalExamples { get; init; } = 512;
    public DemoLlmArchitecture Architecture { get; init; } = new();
    /// <summary>Folder for the random-init model, the corpus and the YAML (default: a temporary folder, deleted afterwards).</summary>
    public string? WorkDir { get; init; }
}

/// <summary>What <see cref="DemoLlm.Pretrain"/> did.</summary>
public sealed record DemoLlmPretrainResult(string ModelDir, string ConfigYaml, long Steps, double FirstLoss, double FinalLoss, double? FinalEvalLoss,
    TimeSpan TrainTime, TimeSpan TotalTime, IReadOnlyDictionary<string, double> TaskAccuracy, long Parameters);

/// <summary>
/// The demo language model: a small Llama (HF folder: config.json, model.safetensors, tokenizer.json byte-level BPE,
/// tokenizer_config.json with a ChatML chat template, generation_config.json) created from a seed by
/// <see cref="InitFolder"/> and pretrained with full-parameter training by <see cref="LlmTrainer"/> on the generated
/// instruction corpus of <see cref="TextTasks"/> (<see cref="Pretrain"/>).
/// </summary>
public static class DemoLlm
{
    public const string EndOfText = "<|endoftext|>";
    public const string ImStart = "<|im_start|>";
    public const string ImEnd = "<|im_end|>";

    /// <summary>The ChatML Jinja template (the Qwen2 one without its default system turn); <see cref="ChatTemplates.Detect"/> reads it as ChatML.</summary>
    public const string ChatTemplate =
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
        + "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

    const string Gpt2Pattern = @"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

    /// <summary>
    /// Learns byte-level BPE merges (GPT-2 byte symbols; most frequent pair first, ties by ordinal order) until every
    /// word is one symbol. Words are pre-tokens as the GPT-2 regex cuts them, e.g. "cat" and " cat".
    /// </summary>
    public static List<(string A, string B)> LearnMerges(IEnumerable<string> words)
    {
        var b2u = ClipTokenizer.BuildByteToUnicode();
        var symbols = words.Distinct(StringComparer.Ordinal).OrderBy(w => w, StringComparer.Ordinal)
            .Select(w => Encoding.UTF8.GetBytes(w).Select(b => b2u[b]).ToList()).Where(s => s.Count > 1).ToList();
        return DemoTokenizer.LearnMergesOfSymbols(symbols);
    }

    /// <summary>The pre-tokens the demo tokenizer makes single tokens: every vocabulary word with and without a leading space, and the chat roles.</summary>
    public static IEnumerable<string> TokenizerWords() =>
        TextTasks.Vocabulary().SelectMany(w => new[] { w, " " + w }).Concat(["user", "assistant", "system"]);

    /// <summary>
    /// Writes tokenizer.json (HF <c>tokenizers</c> format: byte-level BPE with the GPT-2 regex, the 256 byte symbols,
    /// the learned merges, then &lt;|endoftext|&gt;, &lt;|im_start|&gt;, &lt;|im_end|&gt; as special added tokens) and
    /// tokenizer_config.json (eos &lt;|im_end|&gt;, pad &lt;|endoftext|&gt;, no BOS, ChatML chat template). Returns the vocabulary size.
    /// </summary>
    public static int WriteTokenizer(string folder)
    {
        Directory.CreateDirectory(folder);
        var b2u = ClipTokenizer.BuildByteToUnicode();
        var vocab = new JsonObject();
        int next = 0;
        var seen = new HashSet<string>(StringComparer.Ordinal);
        void Add(string token) { if (seen.Add(token)) vocab[token] = next++; }
        for (int b = 0; b < 256; b++) Add(b2u[b]);
        var merges = LearnMerges(TokenizerWords());
        foreach (var (a, b) in merges) Add(a + b);
        var specials = new[] { EndOfText, ImStart, ImEnd };
        var added = new JsonArray();
        var addedDecoder = new JsonObject();
        foreach (var s in specials)
        {
            int id = next++;
            added.Add(new JsonObject { ["id"] = id, ["content"] = s, ["single_word"] = false, ["lstrip"] = false, ["rstrip"] = false, ["normalized"] = false, ["special"] = true });
            addedDecoder[id.ToString(CultureInfo.InvariantCulture)] = new JsonObject { ["content"] = s, ["lstrip"] = false, ["normalized"] = false, ["rstrip"] = false, ["single_word"] = false, ["special"] = true };
        }
        var tokenizer = new JsonObject
        {
            ["version"] = "1.0",
            ["truncation"] = null,
            ["padding"] = null,
            ["added_tokens"] = added,
            ["normalizer"] = null,
            ["pre_tokenizer"] = new JsonObject { ["type"] = "ByteLevel", ["add_prefix_space"] = false, ["trim_offsets"] = true, ["use_regex"] = true },
            ["post_processor"] = new JsonObject { ["type"] = "ByteLevel", ["add_prefix_space"] = true, ["trim_offsets"] = false, ["use_regex"] = true },
            ["decoder"] = new JsonObject { ["type"] = "ByteLevel", ["add_prefix_space"] = true, ["trim_offsets"] = true, ["use_regex"] = true },
            ["model"] = new JsonObject
            {
                ["type"] = "BPE", ["dropout"] = null, ["unk_token"] = null, ["continuing_subword_prefix"] = null, ["end_of_word_suffix"] = null,
                ["fuse_unk"] = false, ["byte_fallback"] = false,
                ["vocab"] = vocab,
                ["merges"] = new JsonArray(merges.Select(m => (JsonNode)JsonValue.Create(m.A + " " + m.B)!).ToArray()),
            },
        };
        var config = new JsonObject
        {
            ["add_bos_token"] = false,
            ["add_eos_token"] = false,
            ["added_tokens_decoder"] = addedDecoder,
            ["bos_token"] = null,
            ["chat_template"] = ChatTemplate,
            ["clean_up_tokenization_spaces"] = false,
            ["eos_token"] = ImEnd,
            ["model_max_length"] = 128,
            ["pad_token"] = EndOfText,
            ["tokenizer_class"] = "PreTrainedTokenizerFast",
        };
        WriteJson(Path.Combine(folder, "tokenizer.json"), tokenizer);
        WriteJson(Path.Combine(folder, "tokenizer_config.json"), config);
        return next;
    }

    static void WriteJson(string path, JsonNode node) =>
        IO.AtomicFile.WriteAllText(path, node.ToJsonString(new JsonSerializerOptions { WriteIndented = true, Encoder = System.Text.Encodings.Web.JavaScriptEncoder.UnsafeRelaxedJsonEscaping }) + "\n");

    /// <summary>The HF config.json of the demo model for a tokenizer of <paramref name="vocabSize"/> tokens.</summary>
    public static JsonObject ConfigJson(DemoLlmArchitecture a, int vocabSize, int eosId, int padId) => new()
    {
        ["architectures"] = new JsonArray("LlamaForCausalLM"),
        ["attention_bias"] = false,
        ["attention_dropout"] = 0.0,
        ["bos_token_id"] = null,
        ["eos_token_id"] = eosId,
        ["head_dim"] = a.HiddenSize / a.Heads,
        ["hidden_act"] = "silu",
        ["hidden_size"] = a.HiddenSize,
        ["initializer_range"] = 0.02,
        ["intermediate_size"] = a.IntermediateSize,
        ["max_position_embeddings"] = a.MaxPositions,
        ["mlp_bias"] = false,
        ["model_type"] = "llama",
        ["num_attention_heads"] = a.Heads,
        ["num_hidden_layers"] = a.Layers,
        ["num_key_value_heads"] = a.KeyValueHeads,
        ["pad_token_id"] = padId,
        ["pretraining_tp"] = 1,
        ["rms_norm_eps"] = 1e-5,
        ["rope_scaling"] = null,
        ["rope_theta"] = 10000.0,
        ["tie_word_embeddings"] = true,
        ["torch_dtype"] = "float32",
        ["use_cache"] = true,
        ["vocab_size"] = vocabSize,
    };

    /// <summary>
    /// Writes a complete HF model folder with random weights (HF init: normal, std 0.02, from <paramref name="seed"/>;
    /// norms 1): tokenizer files, config.json, generation_config.json and model.safetensors (float32).
    /// </summary>
    public static LlamaConfig InitFolder(string folder, int seed, DemoLlmArchitecture? architecture = null)
    {
        var a = architecture ?? new DemoLlmArchitecture();
        if (a.HiddenSize % a.Heads != 0 || a.Heads % a.KeyValueHeads != 0)
            throw new ArgumentException("hidden size must be a multiple of heads, heads a multiple of key/value heads", nameof(architecture));
        Directory.CreateDirectory(folder);
        int vocab = WriteTokenizer(folder);
        var tok = LlmTokenizer.Load(folder);
        int eos = tok.Tokenizer.TokenToId(ImEnd)!.Value, pad = tok.Tokenizer.TokenToId(EndOfText)!.Value;
        WriteJson(Path.Combine(folder, "config.json"), ConfigJson(a, vocab, eos, pad));
        WriteJson(Path.Combine(folder, "generation_config.json"), new JsonObject
        {
            ["do_sample"] = false, ["eos_token_id"] = new JsonArray(eos, pad), ["pad_token_id"] = pad, ["max_new_tokens"] = 32,
        });
        var config = LlamaConfig.Load(folder);
        using var gen = new Generator((ulong)seed);
        using var model = new LlamaForCausalLM(config, init: WeightInit.Random, initStd: 0.02, generator: gen);
        LlamaCheckpoint.SaveWeights(model, Path.Combine(folder, "model.safetensors"), ScalarType.Float32);
        return config;
    }

    /// <summary>The Axolotl-style YAML that pretrains the demo model: full fine-tuning (no adapter) of all parameters.</summary>
    public static string PretrainYaml(string initModel, string corpus, string outputDir, DemoLlmPretrainOptions o) => $"""
        # Pretraining of the LoraSharp demo language model: full-parameter training (no adapter) from random weights.
        base_model: {initModel}
        datasets:
          - path: {corpus}
            type: chat_template
        chat_template: tokenizer_default
        sequence_len: 64
        train_on_inputs: false
        micro_batch_size: {o.BatchSize}
        gradient_accumulation_steps: 1
        max_steps: {o.Steps}
        learning_rate: {o.LearningRate.ToString(CultureInfo.InvariantCulture)}
        lr_scheduler: cosine
        warmup_steps: {o.WarmupSteps}
        optimizer: adamw_torch
        weight_decay: 0.0
        max_grad_norm: 1.0
        val_set_size: {o.EvalExamples}
        eval_steps: 500
        seed: {o.Seed}
        output_dir: {outputDir}
        """;

    /// <summary>
    /// Pretrains the demo model into <paramref name="outDir"/>: writes a random-init folder (<see cref="InitFolder"/>),
    /// the generated corpus (<see cref="TextTasks.Pretraining"/>) and the YAML (<see cref="PretrainYaml"/>) into the
    /// work folder, runs <see cref="LlmTrainer"/> (full fine-tuning), and measures the exact-match accuracy of every
    /// pretraining task on fresh examples. The output holds the HF folder, <c>pretrain_loss.png</c>, <c>pretrain.yaml</c>
    /// and <c>pretraining.json</c> (settings, losses, time, accuracy).
    /// </summary>
    public static DemoLlmPretrainResult Pretrain(string outDir, DemoLlmPretrainOptions o, Action<LlmTrainProgress>? progress = null, Action<string>? log = null)
    {
        log ??= _ => { };
        var total = Stopwatch.StartNew();
        var work = o.WorkDir ?? Path.Combine(Path.GetTempPath(), $"lorasharp-demo-llm-{Environment.ProcessId}-{Guid.NewGuid():N}");
        try
        {
            Directory.CreateDirectory(work);
            outDir = Path.GetFullPath(outDir);
            var init = Path.Combine(work, "init");
            var cfg = InitFolder(init, o.Seed, o.Architecture);
            log($"random-init model: {cfg.ParameterCount():N0} parameters, vocabulary {cfg.VocabSize} → {init}");
            var corpus = Path.Combine(work, "pretrain.jsonl");
            TextTasks.WriteJsonl(corpus, TextTasks.Pretraining(o.Examples, o.Seed));
            var yaml = PretrainYaml(init, corpus, outDir, o);
            var yamlPath = Path.Combine(work, "pretrain.yaml");
            File.WriteAllText(yamlPath, yaml);
            log($"corpus: {o.Examples} generated examples → {corpus}; config → {yamlPath}");
            Directory.CreateDirectory(outDir);
            foreach (var stale in new[] { "model.safetensors", "tokenizer.model" })
                if (File.Exists(Path.Combine(outDir, stale))) File.Delete(Path.Combine(outDir, stale));

            var train = Stopwatch.StartNew();
            LlmTrainResult r;
            using (var trainer = new LlmTrainer(LlmTrainConfig.Load(yamlPath), new LlmTrainerOptions { WritePlot = true }))
            {
                if (progress is not null) trainer.Progress += progress;
                r = trainer.Train();
            }
            train.Stop();
            File.Move(Path.Combine(outDir, "loss.png"), Path.Combine(outDir, "pretrain_loss.png"), overwrite: true);
            File.WriteAllText(Path.Combine(outDir, "pretrain.yaml"), yaml.Replace(init, "<work>/init").Replace(corpus, "<work>/pretrain.jsonl").Replace(outDir, "<out>"));

            var accuracy = TaskAccuracy(outDir, perTask: 50, seed: o.Seed + 1000);
            int n = Math.Max(1, r.LossHistory.Count / 10);
            double final = r.LossHistory.TakeLast(n).Average(h => h.Loss);
            var info = new JsonObject
            {
                ["command"] = $"lorasharp demo pretrain-llm --seed {o.Seed} --examples {o.Examples} --steps {o.Steps} --batch {o.BatchSize} --lr {o.LearningRate.ToString(CultureInfo.InvariantCulture)}",
                ["corpus"] = "generated by LoraSharp.Demo.TextTasks.Pretraining (the project's own generator and licence)",
                ["parameters"] = cfg.ParameterCount(),
                ["steps"] = r.Steps,
                ["first_loss"] = r.LossHistory[0].Loss,
                ["final_loss_mean_last_10pct"] = final,
                ["final_eval_loss"] = r.FinalEvalLoss,
                ["train_seconds"] = Math.Round(train.Elapsed.TotalSeconds, 1),
                ["torch_threads"] = torch.get_num_threads(),
                ["task_exact_match"] = new JsonObject(accuracy.Select(kv => KeyValuePair.Create(kv.Key, (JsonNode?)JsonValue.Create(kv.Value)))),
            };
            WriteJson(Path.Combine(outDir, "pretraining.json"), info);
            return new DemoLlmPretrainResult(outDir, yamlPath, r.Steps, r.LossHistory[0].Loss, final, r.FinalEvalLoss, train.Elapsed, total.Elapsed, accuracy, cfg.ParameterCount());
        }
        finally
        {
            if (o.WorkDir is null && Directory.Exists(work)) Directory.Delete(work, true);
        }
    }

    /// <summary>
    /// Writes the quickstart's data for the held-out task: <c>train.jsonl</c> (<paramref name="train"/> distinct
    /// "swap" examples, seed <paramref name="seed"/>) and <c>eval.jsonl</c> (<paramref name="eval"/> distinct examples,
    /// seed + 1, none with a training prompt).
    /// </summary>
    public static (string Train, string Eval) WriteQuickstartData(string folder, int train, int eval, int seed)
    {
        var trainSet = TextTasks.Distinct(TextTasks.HeldOutTask, train, seed);
        var evalSet = TextTasks.Distinct(TextTasks.HeldOutTask, eval, seed + 1, trainSet.Select(e => e.Prompt));
        var (trainPath, evalPath) = (Path.Combine(folder, "train.jsonl"), Path.Combine(folder, "eval.jsonl"));
        TextTasks.WriteJsonl(trainPath, trainSet);
        TextTasks.WriteJsonl(evalPath, evalSet);
        return (trainPath, evalPath);
    }

    /// <summary>Greedy exact-match accuracy of each pretraining task on <paramref name="perTask"/> fresh examples.</summary>
    public static Dictionary<string, double> TaskAccuracy(string modelDir, int perTask, int seed)
    {
        using var model = LlamaCheckpoint.Load(modelDir);
        var tok = LlmTokenizer.Load(modelDir);
        var result = new Dictionary<string, double>();
        for (int t = 0; t < TextTasks.PretrainingTasks.Count; t++)
        {
            var task = TextTasks.PretrainingTasks[t];
            var rng = new Random(seed * 31 + t);
            var examples = Enumerable.Range(0, perTask).Select(_ => TextTasks.Example(task, rng)).ToList();
            result[task] = ExactMatch.Evaluate(model, tok, examples).Rate;
        }
        return result;
    }
}

/// <summary>Greedy generation of chat prompts and exact comparison with the expected answers.</summary>
public static class ExactMatch
{
    /// <summary>One evaluated prompt.</summary>
    public sealed record Row(string Prompt, string Expected, string Output, bool Correct);

    /// <summary>The rows and the share that matched.</summary>
    public sealed record Report(IReadOnlyList<Row> Rows)
    {
        public int Correct => Rows.Count(r => r.Correct);
        public double Rate => Rows.Count == 0 ? 0 : Correct / (double)Rows.Count;
    }

    /// <summary>
    /// Renders each prompt as a user turn with the tokenizer's chat template, decodes greedily until a stop token
    /// (at most the expected answer's length + 4 tokens), and counts an answer correct when its tokens equal the
    /// expected answer's tokens followed by a stop token.
    /// </summary>
    public static Report Evaluate(LlamaForCausalLM model, LlmTokenizer tokenizer, IReadOnlyList<TextExample> examples, Action<int, int>? progress = null)
    {
        bool training = model.training;
        model.eval();
        try
        {
            using var noGrad = torch.no_grad();
            var rows = new List<Row>();
            foreach (var e in examples)
            {
                var prompt = tokenizer.EncodeChat([ChatMessage.User(e.Prompt)], addGenerationPrompt: true);
                var expected = tokenizer.Tokenizer.Encode(e.Answer);
                var got = LlamaGenerator.GenerateAll(model, prompt, new GenerationOptions { MaxNewTokens = expected.Count + 4, StopTokens = tokenizer.StopTokenIds });
                bool stopped = got.Count > 0 && tokenizer.StopTokenIds.Contains(got[^1]);
                var answer = stopped ? got.Take(got.Count - 1).ToList() : got;
                rows.Add(new Row(e.Prompt, e.Answer, tokenizer.Decode(answer) + (stopped ? "" : "…"), stopped && answer.SequenceEqual(expected)));
                progress?.Invoke(rows.Count, examples.Count);
            }
            return new Report(rows);
        }
        finally { if (training) model.train(); }
    }
}
