using System.Text.Json;
using System.Text.Json.Nodes;

namespace LoraSharp.Models.Llama;

/// <summary>How RoPE frequencies are rescaled for contexts longer than the model was trained on (HF <c>rope_scaling</c>).</summary>
/// <param name="Type">"linear", "dynamic" or "llama3" (HF <c>rope_type</c>, or the older <c>type</c>).</param>
/// <param name="Factor">The context extension factor.</param>
/// <param name="LowFreqFactor">llama3 only (HF default 1).</param>
/// <param name="HighFreqFactor">llama3 only (HF default 4).</param>
/// <param name="OriginalMaxPositionEmbeddings">llama3 only: the pre-training context length (HF default 8192).</param>
public sealed record RopeScaling(string Type, double Factor, double LowFreqFactor = 1.0, double HighFreqFactor = 4.0,
    int OriginalMaxPositionEmbeddings = 8192);

/// <summary>
/// The hyper-parameters of a LLaMA-family decoder (Llama 1/2/3, Mistral, Qwen2), read from a Hugging Face
/// <c>config.json</c> with the HF field names and HF defaults.
/// </summary>
public sealed record LlamaConfig
{
    public string ModelType { get; init; } = "llama";
    public int VocabSize { get; init; } = 32000;
    public int HiddenSize { get; init; } = 4096;
    public int IntermediateSize { get; init; } = 11008;
    public int NumHiddenLayers { get; init; } = 32;
    public int NumAttentionHeads { get; init; } = 32;
    /// <summary>Key/value heads for grouped-query attention; equals <see cref="NumAttentionHeads"/> for plain multi-head attention.</summary>
    public int NumKeyValueHeads { get; init; } = 32;
    /// <summary>Per-head width; HF default hidden_size / num_attention_heads.</summary>
    public int HeadDim { get; init; } = 128;
    public double RmsNormEps { get; init; } = 1e-6;
    public double RopeTheta { get; init; } = 10000.0;
    public RopeScaling? RopeScaling { get; init; }
    public int MaxPositionEmbeddings { get; init; } = 2048;
    public bool TieWordEmbeddings { get; init; }
    /// <summary>Bias on q/k/v projections (HF <c>attention_bias</c>; Qwen2 always has it).</summary>
    public bool AttentionBias { get; init; }
    /// <summary>Bias on o_proj: Llama puts <c>attention_bias</c> on all four projections; Qwen2 only on q/k/v.</summary>
    public bool OutputProjectionBias { get; init; }
    public bool MlpBias { get; init; }
    /// <summary>Mistral / Qwen2 sliding-window attention width, or null for full causal attention.</summary>
    public int? SlidingWindow { get; init; }
    /// <summary>Qwen2: layers with index ≥ this use the sliding window (when <see cref="SlidingWindow"/> is set); 0 for Mistral (all layers).</summary>
    public int MaxWindowLayers { get; init; }
    public string HiddenAct { get; init; } = "silu";
    public int? BosTokenId { get; init; }
    public IReadOnlyList<int> EosTokenIds { get; init; } = [];
    public int? PadTokenId { get; init; }

    /// <summary>Whether layer <paramref name="layer"/> masks keys further back than <see cref="SlidingWindow"/>.</summary>
    public bool UsesSlidingWindow(int layer) => SlidingWindow is not null && layer >= MaxWindowLayers;

    /// <summary>Parameter count of the model (tied embeddings counted once).</summary>
    public long ParameterCount()
    {
        long h = HiddenSize, kv = (long)NumKeyValueHeads * HeadDim, q = (long)NumAttentionHeads * HeadDim;
        long attn = h * q + 2 * h * kv + q * h + (AttentionBias ? q + 2 * kv : 0) + (OutputProjectionBias ? h : 0);
        long mlp = 3 * h * IntermediateSize + (MlpBias ? 2 * IntermediateSize + h : 0);
        long layer = attn + mlp + 2 * h;
        return VocabSize * h * (TieWordEmbeddings ? 1 : 2) + NumHiddenLayers * layer + h;
    }

    /// <summary>Reads <c>config.json</c> (a file, or a folder holding one).</summary>
    public static LlamaConfig Load(string path)
    {
        var file = Directory.Exists(path) ? Path.Combine(path, "config.json") : path;
        if (!File.Exists(file))
            throw new LoraSharpException("config.json not found", file);
        return Parse(File.ReadAllText(file), file);
    }

    /// <summary>Parses the JSON text of an HF config; <paramref name="source"/> names it in errors.</summary>
    public static LlamaConfig Parse(string json, string source = "config.json")
    {
        JsonObject root;
        try
        {
            root = JsonNode.Parse(json) as JsonObject ?? throw new LoraSharpException("expected a JSON object", source);
        }
        catch (Exception e) when (e is JsonException or ArgumentException)
        {
            throw new LoraSharpException("invalid JSON: " + e.Message, source, inner: e);
        }

        var reader = new FieldReader(root, source);
        var modelType = reader.String("model_type") ?? "llama";
        if (modelType is not ("llama" or "mistral" or "qwen2"))
            throw new LoraSharpException($"model_type '{modelType}' is not a LLaMA-family model (expected llama, mistral or qwen2)", source, "model_type");

        int hidden = reader.RequiredInt("hidden_size");
        int heads = reader.RequiredInt("num_attention_heads");
        int kvHeads = reader.Int("num_key_value_heads") ?? heads;
        if (hidden <= 0 || heads <= 0 || kvHeads <= 0 || heads % kvHeads != 0)
            throw new LoraSharpException($"num_attention_heads ({heads}) must be a positive multiple of num_key_value_heads ({kvHeads})", source, "num_key_value_heads");
        int headDim = reader.Int("head_dim") ?? hidden / heads;
        if (headDim <= 0 || headDim % 2 != 0)
            throw new LoraSharpException($"head_dim must be a positive even number, got {headDim}", source, "head_dim");

        bool isQwen2 = modelType == "qwen2";
        bool attentionBias = isQwen2 || (reader.Bool("attention_bias") ?? false);
        int? slidingWindow = reader.Int("sliding_window");
        int maxWindowLayers = 0;
        if (isQwen2)
        {
            // Qwen2 configs carry a sliding_window value but only use it when use_sliding_window is true.
            if (!(reader.Bool("use_sliding_window") ?? false)) slidingWindow = null;
            maxWindowLayers = reader.Int("max_window_layers") ?? 0;
        }

        var act = reader.String("hidden_act") ?? "silu";
        if (act is not ("silu" or "swish"))
            throw new LoraSharpException($"hidden_act '{act}' is not supported (expected silu)", source, "hidden_act");

        return new LlamaConfig
        {
            ModelType = modelType,
            VocabSize = reader.RequiredInt("vocab_size"),
            HiddenSize = hidden,
            IntermediateSize = reader.RequiredInt("intermediate_size"),
            NumHiddenLayers = reader.RequiredInt("num_hidden_layers"),
            NumAttentionHeads = heads,
            NumKeyValueHeads = kvHeads,
            HeadDim = headDim,
            RmsNormEps = reader.Double("rms_norm_eps") ?? 1e-6,
            RopeTheta = reader.Double("rope_theta") ?? 10000.0,
            RopeScaling = ParseRopeScaling(root["rope_scaling"], source),
            MaxPositionEmbeddings = reader.Int("max_position_embeddings") ?? 2048,
            TieWordEmbeddings = reader.Bool("tie_word_embeddings") ?? false,
            AttentionBias = attentionBias,
            OutputProjectionBias = !isQwen2 && attentionBias,
            MlpBias = reader.Bool("mlp_bias") ?? false,
            SlidingWindow = slidingWindow,
            MaxWindowLayers = maxWindowLayers,
            HiddenAct = act,
            BosTokenId = reader.Int("bos_token_id"),
            EosTokenIds = reader.IntOrIntList("eos_token_id"),
            PadTokenId = reader.Int("pad_token_id"),
        };
    }

    static RopeScaling? ParseRopeScaling(JsonNode? node, string source)
    {
        if (node is null) return null;
        if (node is not JsonObject obj)
            throw new LoraSharpException("rope_scaling must be an object or null", source, "rope_scaling");
        var reader = new FieldReader(obj, source, "rope_scaling.");
        var type = reader.String("rope_type") ?? reader.String("type")
            ?? throw new LoraSharpException("rope_scaling needs rope_type (linear, dynamic or llama3)", source, "rope_scaling.rope_type");
        if (type == "default") return null;
        if (type is not ("linear" or "dynamic" or "llama3"))
            throw new LoraSharpException($"rope_scaling type '{type}' is not supported (expected linear, dynamic or llama3)", source, "rope_scaling.rope_type");
        var factor = reader.Double("factor") ?? throw new LoraSharpException("rope_scaling needs factor", source, "rope_scaling.factor");
        return new RopeScaling(type, factor,
            reader.Double("low_freq_factor") ?? 1.0,
            reader.Double("high_freq_factor") ?? 4.0,
            reader.Int("original_max_position_embeddings") ?? 8192);
    }

    /// <summary>Typed access to optional JSON fields with errors naming the file and the key.</summary>
    sealed class FieldReader(JsonObject obj, string source, string prefix = "")
    {
        JsonValue? Value(string key, string expected)
        {
            var node = obj[key];
            if (node is null) return null;
            return node as JsonValue ?? throw new LoraSharpException($"expected {expected}", source, prefix + key);
        }

        public string? String(string key) =>
            Value(key, "a string") is { } v ? (v.TryGetValue<string>(out var s) ? s : throw Bad(key, "a string", v)) : null;

        public int? Int(string key)
        {
            if (Value(key, "an integer") is not { } v) return null;
            if (v.GetValueKind() == JsonValueKind.Number && v.TryGetValue<double>(out var d) && d == Math.Floor(d) && Math.Abs(d) <= int.MaxValue)
                return (int)d;
            throw Bad(key, "an integer", v);
        }

        public int RequiredInt(string key) => Int(key) ?? throw new LoraSharpException("missing required field", source, prefix + key);

        public double? Double(string key) =>
            Value(key, "a number") is { } v ? (v.GetValueKind() == JsonValueKind.Number ? v.GetValue<double>() : throw Bad(key, "a number", v)) : null;

        public bool? Bool(string key) =>
            Value(key, "true or false") is { } v ? (v.TryGetValue<bool>(out var b) ? b : throw Bad(key, "true or false", v)) : null;

        public IReadOnlyList<int> IntOrIntList(string key)
        {
            var node = obj[key];
            if (node is null) return [];
            if (node is JsonArray array)
                return array.Select((n, i) => n is JsonValue v && v.GetValueKind() == JsonValueKind.Number ? v.GetValue<int>()
                    : throw new LoraSharpException("expected an integer list", source, $"{prefix}{key}[{i}]")).ToArray();
            return [Int(key)!.Value];
        }

        LoraSharpException Bad(string key, string expected, JsonNode got) =>
            new($"expected {expected}, got {got.ToJsonString()}", source, prefix + key);
    }
}
