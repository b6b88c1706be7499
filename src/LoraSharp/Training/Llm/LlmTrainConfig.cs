using System.Globalization;
using LoraSharp.Training.Optim;
using YamlDotNet.Core;
using YamlDotNet.RepresentationModel;

namespace LoraSharp.Training.Llm;

/// <summary>How a JSONL dataset's lines are read.</summary>
public enum LlmDatasetType
{
    /// <summary>{"instruction", "input" (optional), "output"}: the Alpaca prompt, the output is the response.</summary>
    Alpaca,
    /// <summary>Chat turns: {"messages": [{"role", "content"}]} (OpenAI) or {"conversations": [{"from", "value"}]} (ShareGPT).</summary>
    Chat,
    /// <summary>{"text"}: plain text, every token is trained.</summary>
    Completion,
}

/// <summary>One entry of <c>datasets:</c>.</summary>
public sealed record LlmDatasetConfig
{
    /// <summary>JSONL file (relative paths are resolved against the config file's folder).</summary>
    public required string Path { get; init; }
    public LlmDatasetType Type { get; init; } = LlmDatasetType.Alpaca;
    /// <summary>Chat: the field holding the turns; null = "messages" or "conversations", whichever the line has.</summary>
    public string? FieldMessages { get; init; }
}

/// <summary>
/// An Axolotl-style training config (YAML). Field names are Axolotl's; <see cref="Load"/> rejects unknown keys,
/// listing the valid ones.
/// </summary>
public sealed record LlmTrainConfig
{
    public required string BaseModel { get; init; }
    public IReadOnlyList<LlmDatasetConfig> Datasets { get; init; } = [];
    /// <summary>tokenizer_default (the model's template), llama2, llama3, chatml.</summary>
    public string ChatTemplate { get; init; } = "tokenizer_default";
    public int SequenceLen { get; init; } = 512;
    public bool SamplePacking { get; init; }
    public bool TrainOnInputs { get; init; }
    /// <summary>"lora", "qlora", or null for full fine-tuning.</summary>
    public string? Adapter { get; init; }
    public int LoraR { get; init; } = 8;
    public double LoraAlpha { get; init; } = 16;
    public double LoraDropout { get; init; } = 0.05;
    public IReadOnlyList<string> LoraTargetModules { get; init; } = [];
    public bool LoraTargetLinear { get; init; }
    public bool UseRslora { get; init; }
    public bool UseDora { get; init; }
    public int MicroBatchSize { get; init; } = 1;
    public int GradientAccumulationSteps { get; init; } = 1;
    public double NumEpochs { get; init; } = 1;
    /// <summary>Optimizer steps; when set it overrides num_epochs.</summary>
    public long? MaxSteps { get; init; }
    public double LearningRate { get; init; } = 2e-4;
    public LrScheduleKind LrScheduler { get; init; } = LrScheduleKind.Cosine;
    public long? WarmupSteps { get; init; }
    public double? WarmupRatio { get; init; }
    /// <summary>adamw_torch (fp32 moments) or adamw_8bit (8-bit blockwise moments).</summary>
    public string Optimizer { get; init; } = "adamw_torch";
    public double WeightDecay { get; init; }
    public double MaxGradNorm { get; init; } = 1.0;
    public bool GradientCheckpointing { get; init; }
    public bool Bf16 { get; init; }
    /// <summary>Fraction (&lt; 1) or count (≥ 1) of samples held out for evaluation.</summary>
    public double ValSetSize { get; init; }
    public long? EvalSteps { get; init; }
    public long? SaveSteps { get; init; }
    public int Seed { get; init; } = 42;
    public string OutputDir { get; init; } = "./outputs";
    public long LoggingSteps { get; init; } = 1;

    /// <summary>The file the config came from (relative paths resolve against its folder), or null.</summary>
    public string? SourcePath { get; init; }

    public bool IsQLora => Adapter == "qlora";
    public bool IsFullFineTune => Adapter is null;
    public bool Uses8BitOptimizer => Optimizer is "adamw_8bit" or "adamw_bnb_8bit";

    /// <summary>Every key the YAML may have.</summary>
    public static readonly IReadOnlyList<string> ValidKeys =
    [
        "base_model", "datasets", "chat_template", "sequence_len", "sample_packing", "train_on_inputs", "adapter", "lora_r",
        "lora_alpha", "lora_dropout", "lora_target_modules", "lora_target_linear", "use_rslora", "peft_use_rslora", "use_dora",
        "peft_use_dora", "micro_batch_size", "gradient_accumulation_steps", "num_epochs", "max_steps", "learning_rate",
        "lr_scheduler", "warmup_steps", "warmup_ratio", "optimizer", "weight_decay", "max_grad_norm", "gradient_checkpointing",
        "bf16", "val_set_size", "eval_steps", "save_steps", "seed", "output_dir", "logging_steps",
    ];

    public static readonly IReadOnlyList<string> ValidDatasetKeys = ["path", "type", "field_messages"];

    /// <summary>Resolves a path of the config against the config file's folder (absolute paths unchanged).</summary>
    public string Resolve(string path) =>
        System.IO.Path.IsPathRooted(path) || SourcePath is null ? System.IO.Path.GetFullPath(path)
        : System.IO.Path.GetFullPath(System.IO.Path.Combine(System.IO.Path.GetDirectoryName(System.IO.Path.GetFullPath(SourcePath))!, path));

    public static LlmTrainConfig Load(string path)
    {
        if (!File.Exists(path)) throw new LoraSharpException("config file not found", path);
        return Parse(File.ReadAllText(path), path);
    }

    /// <summary>Parses YAML text; <paramref name="source"/> names the file in errors and anchors relative paths.</summary>
    public static LlmTrainConfig Parse(string yaml, string? source = null)
    {
        var stream = new YamlStream();
        try { stream.Load(new StringReader(yaml)); }
        catch (YamlException e) { throw new LoraSharpException($"invalid YAML at line {e.Start.Line}: {e.Message}", source, inner: e); }
        if (stream.Documents.Count == 0 || stream.Documents[0].RootNode is not YamlMappingNode root)
            throw new LoraSharpException("expected a YAML mapping of training settings", source);

        var values = new Dictionary<string, YamlNode>(StringComparer.Ordinal);
        foreach (var (k, v) in root.Children)
        {
            var key = ((YamlScalarNode)k).Value ?? "";
            if (!ValidKeys.Contains(key))
                throw new LoraSharpException($"unknown key '{key}' (line {k.Start.Line}); valid keys: {string.Join(", ", ValidKeys)}", source, key);
            values[key] = v;
        }
        var r = new Reader(values, source);
        string adapter = r.Str("adapter", "") ?? "";
        adapter = adapter.Trim().ToLowerInvariant();
        if (adapter is not ("" or "lora" or "qlora"))
            throw new LoraSharpException($"adapter must be lora, qlora or empty (full fine-tuning), got '{adapter}'", source, "adapter");
        var optimizer = (r.Str("optimizer", "adamw_torch") ?? "adamw_torch").ToLowerInvariant();
        if (optimizer is not ("adamw_torch" or "adamw_torch_fused" or "adamw_hf" or "adamw_8bit" or "adamw_bnb_8bit"))
            throw new LoraSharpException($"unknown optimizer '{optimizer}' (expected adamw_torch, adamw_8bit or adamw_bnb_8bit)", source, "optimizer");
        if (optimizer is "adamw_torch_fused" or "adamw_hf") optimizer = "adamw_torch";

        var config = new LlmTrainConfig
        {
            SourcePath = source,
            BaseModel = r.Str("base_model", null) ?? throw new LoraSharpException("base_model is required (an HF model folder)", source, "base_model"),
            Datasets = ReadDatasets(values, source),
            ChatTemplate = r.Str("chat_template", "tokenizer_default")!,
            SequenceLen = (int)r.Long("sequence_len", 512, min: 2),
            SamplePacking = r.Bool("sample_packing", false),
            TrainOnInputs = r.Bool("train_on_inputs", false),
            Adapter = adapter.Length == 0 ? null : adapter,
            LoraR = (int)r.Long("lora_r", 8, min: 1),
            LoraAlpha = r.Double("lora_alpha", 16),
            LoraDropout = r.Double("lora_dropout", 0.05, min: 0, maxExclusive: 1),
            LoraTargetModules = r.StrList("lora_target_modules"),
            LoraTargetLinear = r.Bool("lora_target_linear", false),
            UseRslora = r.Bool("use_rslora", false) || r.Bool("peft_use_rslora", false),
            UseDora = r.Bool("use_dora", false) || r.Bool("peft_use_dora", false),
            MicroBatchSize = (int)r.Long("micro_batch_size", 1, min: 1),
            GradientAccumulationSteps = (int)r.Long("gradient_accumulation_steps", 1, min: 1),
            NumEpochs = r.Double("num_epochs", 1, min: 0),
            MaxSteps = r.OptLong("max_steps", min: 1),
            LearningRate = r.Double("learning_rate", 2e-4, min: 0),
            LrScheduler = LrSchedule.Parse(r.Str("lr_scheduler", "cosine")!),
            WarmupSteps = r.OptLong("warmup_steps", min: 0),
            WarmupRatio = r.OptDouble("warmup_ratio"),
            Optimizer = optimizer,
            WeightDecay = r.Double("weight_decay", 0, min: 0),
            MaxGradNorm = r.Double("max_grad_norm", 1.0, min: 0),
            GradientCheckpointing = r.Bool("gradient_checkpointing", false),
            Bf16 = r.Bool("bf16", false),
            ValSetSize = r.Double("val_set_size", 0, min: 0),
            EvalSteps = r.OptLong("eval_steps", min: 1),
            SaveSteps = r.OptLong("save_steps", min: 1),
            Seed = (int)r.Long("seed", 42, min: 0),
            OutputDir = r.Str("output_dir", "./outputs")!,
            LoggingSteps = r.Long("logging_steps", 1, min: 1),
        };
        if (config.Datasets.Count == 0) throw new LoraSharpException("datasets needs at least one entry with a path", source, "datasets");
        if (config.Adapter is not null && config.LoraTargetModules.Count == 0 && !config.LoraTargetLinear)
            throw new LoraSharpException("set lora_target_modules (a list of module names) or lora_target_linear: true", source, "lora_target_modules");
        if (config.WarmupRatio is double wr && (wr < 0 || wr >= 1))
            throw new LoraSharpException($"warmup_ratio must be in [0, 1), got {wr}", source, "warmup_ratio");
        if (config.MaxSteps is null && config.NumEpochs <= 0)
            throw new LoraSharpException("set num_epochs > 0 or max_steps", source, "num_epochs");
        return config;
    }

    static IReadOnlyList<LlmDatasetConfig> ReadDatasets(Dictionary<string, YamlNode> values, string? source)
    {
        if (!values.TryGetValue("datasets", out var node)) return [];
        if (node is not YamlSequenceNode seq) throw new LoraSharpException("datasets must be a list of {path, type}", source, "datasets");
        var list = new List<LlmDatasetConfig>();
        foreach (var item in seq)
        {
            if (item is not YamlMappingNode map) throw new LoraSharpException($"datasets entry at line {item.Start.Line} must be a mapping with path and type", source, "datasets");
            var entry = new Dictionary<string, YamlNode>();
            foreach (var (k, v) in map.Children)
            {
                var key = ((YamlScalarNode)k).Value ?? "";
                if (!ValidDatasetKeys.Contains(key))
                    throw new LoraSharpException($"unknown dataset key '{key}' (line {k.Start.Line}); valid keys: {string.Join(", ", ValidDatasetKeys)}", source, "datasets." + key);
                entry[key] = v;
            }
            var r = new Reader(entry, source, "datasets.");
            var type = (r.Str("type", "alpaca") ?? "alpaca").ToLowerInvariant() switch
            {
                "alpaca" => LlmDatasetType.Alpaca,
                "chat" or "chat_template" or "sharegpt" or "messages" or "openai" => LlmDatasetType.Chat,
                "completion" => LlmDatasetType.Completion,
                var t => throw new LoraSharpException($"unknown dataset type '{t}' (expected alpaca, chat_template / sharegpt, completion)", source, "datasets.type"),
            };
            list.Add(new LlmDatasetConfig
            {
                Path = r.Str("path", null) ?? throw new LoraSharpException($"datasets entry at line {item.Start.Line} needs a path", source, "datasets.path"),
                Type = type,
                FieldMessages = r.Str("field_messages", null),
            });
        }
        return list;
    }

    sealed class Reader(Dictionary<string, YamlNode> values, string? source, string prefix = "")
    {
        LoraSharpException Bad(string key, string expected, YamlNode node) =>
            new($"expected {expected} (line {node.Start.Line}), got '{(node as YamlScalarNode)?.Value ?? node.NodeType.ToString()}'", source, prefix + key);

        string? Scalar(string key, out YamlNode? node)
        {
            node = null;
            if (!values.TryGetValue(key, out var n)) return null;
            node = n;
            if (n is not YamlScalarNode s) throw Bad(key, "a single value", n);
            var v = s.Value;
            return string.IsNullOrEmpty(v) || v is "null" or "~" ? null : v;
        }

        public string? Str(string key, string? fallback) => Scalar(key, out _) ?? fallback;

        public bool Bool(string key, bool fallback)
        {
            var v = Scalar(key, out var node);
            if (v is null) return fallback;
            return v.ToLowerInvariant() switch
            {
                "true" or "yes" or "on" => true,
                "false" or "no" or "off" => false,
                _ => throw Bad(key, "true or false", node!),
            };
        }

        public long? OptLong(string key, long min = long.MinValue)
        {
            var v = Scalar(key, out var node);
            if (v is null) return null;
            if (!long.TryParse(v, NumberStyles.Integer, CultureInfo.InvariantCulture, out var x) || x < min)
                throw Bad(key, min == long.MinValue ? "an integer" : $"an integer ≥ {min}", node!);
            return x;
        }

        public long Long(string key, long fallback, long min = long.MinValue) => OptLong(key, min) ?? fallback;

        public double? OptDouble(string key, double min = double.NegativeInfinity, double maxExclusive = double.PositiveInfinity)
        {
            var v = Scalar(key, out var node);
            if (v is null) return null;
            if (!double.TryParse(v, NumberStyles.Float, CultureInfo.InvariantCulture, out var x) || x < min || x >= maxExclusive)
                throw Bad(key, double.IsPositiveInfinity(maxExclusive) ? $"a number ≥ {min}" : $"a number in [{min}, {maxExclusive})", node!);
            return x;
        }

        public double Double(string key, double fallback, double min = double.NegativeInfinity, double maxExclusive = double.PositiveInfinity) =>
            OptDouble(key, min, maxExclusive) ?? fallback;

        public IReadOnlyList<string> StrList(string key)
        {
            if (!values.TryGetValue(key, out var n)) return [];
            if (n is YamlScalarNode s) return string.IsNullOrEmpty(s.Value) ? [] : s.Value.Split(',', StringSplitOptions.TrimEntries | StringSplitOptions.RemoveEmptyEntries);
            if (n is YamlSequenceNode seq)
                return seq.Select(x => x is YamlScalarNode sx && sx.Value is not null ? sx.Value : throw Bad(key, "a list of names", x)).ToList();
            throw Bad(key, "a list of names", n);
        }
    }
}
