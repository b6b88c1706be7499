using System.Text.Json;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace LoraSharp.Models.StableDiffusion;

/// <summary>
/// Configuration of a CLIP text transformer, as in Hugging Face's <c>text_encoder/config.json</c>
/// (CLIPTextModel / CLIPTextModelWithProjection). <see cref="ProjectionDim"/> is set for SDXL's second
/// text encoder, whose pooled output goes through a bias-free <c>text_projection</c>.
/// </summary>
public sealed record ClipTextConfig
{
    public int VocabSize { get; init; } = 49408;
    public int HiddenSize { get; init; } = 768;
    public int IntermediateSize { get; init; } = 3072;
    public int NumHiddenLayers { get; init; } = 12;
    public int NumAttentionHeads { get; init; } = 12;
    public int MaxPositionEmbeddings { get; init; } = 77;
    /// <summary>"quick_gelu" (OpenAI CLIP, SD1.x, SDXL encoder 1) or "gelu" (OpenCLIP, SD2.x, SDXL encoder 2).</summary>
    public string HiddenAct { get; init; } = "quick_gelu";
    public double LayerNormEps { get; init; } = 1e-5;
    /// <summary>Width of <c>text_projection</c> (CLIPTextModelWithProjection); null = no projection.</summary>
    public int? ProjectionDim { get; init; }

    /// <summary>Reads a transformers <c>config.json</c>; the projection exists when the architecture says
    /// CLIPTextModelWithProjection.</summary>
    public static ClipTextConfig FromJsonFile(string path)
    {
        using var doc = DiffusersJson.Parse(path);
        var r = doc.RootElement;
        var architectures = r.TryGetProperty("architectures", out var a) && a.ValueKind == JsonValueKind.Array
            ? a.EnumerateArray().Select(e => e.GetString() ?? "").ToArray()
            : [];
        bool withProjection = architectures.Any(s => s.Contains("WithProjection", StringComparison.Ordinal));
        var c = new ClipTextConfig
        {
            VocabSize = DiffusersJson.Int(r, "vocab_size", 49408),
            HiddenSize = DiffusersJson.Int(r, "hidden_size", 512),
            IntermediateSize = DiffusersJson.Int(r, "intermediate_size", 2048),
            NumHiddenLayers = DiffusersJson.Int(r, "num_hidden_layers", 12),
            NumAttentionHeads = DiffusersJson.Int(r, "num_attention_heads", 8),
            MaxPositionEmbeddings = DiffusersJson.Int(r, "max_position_embeddings", 77),
            HiddenAct = DiffusersJson.String(r, "hidden_act", "quick_gelu"),
            LayerNormEps = DiffusersJson.Double(r, "layer_norm_eps", 1e-5),
            ProjectionDim = withProjection ? DiffusersJson.Int(r, "projection_dim", 512) : null,
        };
        c.Validate(path);
        return c;
    }

    /// <summary>transformers' <c>config.json</c> for this config (CLIPTextModelWithProjection when there is a projection).</summary>
    public string ToJson()
    {
        var d = new Dictionary<string, object?>
        {
            ["architectures"] = new[] { ProjectionDim is null ? "CLIPTextModel" : "CLIPTextModelWithProjection" },
            ["attention_dropout"] = 0.0,
            ["bos_token_id"] = 49406,
            ["eos_token_id"] = 49407,
            ["hidden_act"] = HiddenAct,
            ["hidden_size"] = HiddenSize,
            ["initializer_factor"] = 1.0,
            ["initializer_range"] = 0.02,
            ["intermediate_size"] = IntermediateSize,
            ["layer_norm_eps"] = LayerNormEps,
            ["max_position_embeddings"] = MaxPositionEmbeddings,
            ["model_type"] = "clip_text_model",
            ["num_attention_heads"] = NumAttentionHeads,
            ["num_hidden_layers"] = NumHiddenLayers,
            ["pad_token_id"] = 1,
            ["vocab_size"] = VocabSize,
        };
        if (ProjectionDim is int p) d["projection_dim"] = p;
        return DiffusersJson.Write(d);
    }

    internal void Validate(string source)
    {
        if (HiddenSize % NumAttentionHeads != 0)
            throw new LoraSharpException($"hidden_size {HiddenSize} is not divisible by num_attention_heads {NumAttentionHeads}", source, "num_attention_heads");
        if (HiddenAct is not ("quick_gelu" or "gelu"))
            throw new LoraSharpException($"hidden_act '{HiddenAct}' is not supported (expected quick_gelu or gelu)", source, "hidden_act");
    }
}

/// <summary>
/// Outputs of <see cref="ClipTextModel"/>: <see cref="HiddenStates"/> has NumHiddenLayers + 1 entries (the
/// embeddings, then each layer's output, none with the final layer norm), <see cref="LastHiddenState"/> is
/// final_layer_norm of the last one, <see cref="PooledOutput"/> is LastHiddenState at the EOS token
/// (argmax of the ids), <see cref="TextEmbeds"/> the projected pooled output (null without projection).
/// </summary>
public sealed class ClipTextOutput : IDisposable
{
    public required Tensor LastHiddenState { get; init; }
    public required Tensor PooledOutput { get; init; }
    public required IReadOnlyList<Tensor> HiddenStates { get; init; }
    public Tensor? TextEmbeds { get; init; }

    public void Dispose()
    {
        LastHiddenState.Dispose();
        PooledOutput.Dispose();
        TextEmbeds?.Dispose();
        foreach (var h in HiddenStates) h.Dispose();
    }
}

/// <summary>
/// The CLIP text transformer of Stable Diffusion, with Hugging Face's parameter names
/// (<c>text_model.embeddings.token_embedding.weight</c>, <c>text_model.encoder.layers.{i}.self_attn.q_proj</c>,
/// <c>text_model.final_layer_norm</c>, optional <c>text_projection</c>). Pre-norm layers, causal self-attention.
/// </summary>
public sealed class ClipTextModel : nn.Module<Tensor, ClipTextOutput>
{
    /// <summary>Children are registered explicitly under checkpoint names; TorchSharp's field-based registration would add them again under the C# field names.</summary>
    protected override void RegisterComponents() { }

    public ClipTextConfig Config { get; }
    readonly ClipTextTransformer _textModel;
    readonly Linear? _textProjection;

    public ClipTextModel(ClipTextConfig config, Device? device = null, ScalarType? dtype = null) : base(nameof(ClipTextModel))
    {
        config.Validate("ClipTextConfig");
        Config = config;
        _textModel = new ClipTextTransformer(config, device, dtype);
        register_module("text_model", _textModel);
        if (config.ProjectionDim is int p)
        {
            _textProjection = nn.Linear(config.HiddenSize, p, hasBias: false, device: device, dtype: dtype);
            register_module("text_projection", _textProjection);
        }
    }

    /// <summary>Runs the encoder on token ids [B, T] (T ≤ max_position_embeddings).</summary>
    public override ClipTextOutput forward(Tensor inputIds)
    {
        using var scope = NewDisposeScope();
        var hiddenStates = _textModel.call(inputIds);
        var last = _textModel.FinalLayerNorm.call(hiddenStates[^1]);
        var eos = inputIds.argmax(-1);
        var pooled = last[arange(last.shape[0], device: last.device), eos];
        var embeds = _textProjection?.call(pooled);
        var output = new ClipTextOutput
        {
            LastHiddenState = last.MoveToOuterDisposeScope(),
            PooledOutput = pooled.MoveToOuterDisposeScope(),
            HiddenStates = hiddenStates.Select(h => h.MoveToOuterDisposeScope()).ToArray(),
            TextEmbeds = embeds?.MoveToOuterDisposeScope(),
        };
        return output;
    }

    /// <summary>The final layer norm (clip skip: apply it to an earlier hidden state, as A1111/diffusers/kohya do).</summary>
    public LayerNorm FinalLayerNorm => _textModel.FinalLayerNorm;

    /// <summary>
    /// The conditioning the UNet sees with "clip skip" <paramref name="clipSkip"/> (1 = last layer): hidden
    /// state [-clipSkip], with the final layer norm when <paramref name="applyFinalLayerNorm"/> (SD1.x
    /// convention) or raw (SDXL convention: penultimate state without the norm).
    /// </summary>
    public Tensor Encode(Tensor inputIds, int clipSkip = 1, bool applyFinalLayerNorm = true)
    {
        if (clipSkip < 1 || clipSkip > Config.NumHiddenLayers)
            throw new ArgumentOutOfRangeException(nameof(clipSkip), clipSkip, $"clip skip must be in 1..{Config.NumHiddenLayers}");
        using var scope = NewDisposeScope();
        var states = _textModel.call(inputIds);
        var h = states[states.Count - clipSkip];
        var result = applyFinalLayerNorm ? _textModel.FinalLayerNorm.call(h) : h;
        return result.MoveToOuterDisposeScope();
    }
}

/// <summary><c>text_model</c>: embeddings, encoder, final_layer_norm. Returns all hidden states (embeddings first).</summary>
sealed class ClipTextTransformer : nn.Module<Tensor, IReadOnlyList<Tensor>>
{
    /// <summary>Children are registered explicitly under checkpoint names; TorchSharp's field-based registration would add them again under the C# field names.</summary>
    protected override void RegisterComponents() { }

    readonly ClipEmbeddings _embeddings;
    readonly ClipEncoder _encoder;
    internal LayerNorm FinalLayerNorm { get; }

    public ClipTextTransformer(ClipTextConfig c, Device? device, ScalarType? dtype) : base("text_model")
    {
        _embeddings = new ClipEmbeddings(c, device, dtype);
        _encoder = new ClipEncoder(c, device, dtype);
        FinalLayerNorm = Layers.LayerNorm(c.HiddenSize, c.LayerNormEps, device: device, dtype: dtype);
        register_module("embeddings", _embeddings);
        register_module("encoder", _encoder);
        register_module("final_layer_norm", FinalLayerNorm);
    }

    public override IReadOnlyList<Tensor> forward(Tensor inputIds)
    {
        var h = _embeddings.call(inputIds);
        return _encoder.call(h);
    }
}

sealed class ClipEmbeddings : nn.Module<Tensor, Tensor>
{
    /// <summary>Children are registered explicitly under checkpoint names; TorchSharp's field-based registration would add them again under the C# field names.</summary>
    protected override void RegisterComponents() { }

    readonly Embedding _tokenEmbedding;
    readonly Embedding _positionEmbedding;
    readonly int _maxPositions;

    public ClipEmbeddings(ClipTextConfig c, Device? device, ScalarType? dtype) : base("embeddings")
    {
        _maxPositions = c.MaxPositionEmbeddings;
        _tokenEmbedding = nn.Embedding(c.VocabSize, c.HiddenSize, device: device, dtype: dtype);
        _positionEmbedding = nn.Embedding(c.MaxPositionEmbeddings, c.HiddenSize, device: device, dtype: dtype);
        register_module("token_embedding", _tokenEmbedding);
        register_module("position_embedding", _positionEmbedding);
    }

    public override Tensor forward(Tensor inputIds)
    {
        long length = inputIds.shape[^1];
        if (length > _maxPositions)
            throw new ArgumentException($"Token sequence of length {length} exceeds max_position_embeddings {_maxPositions}.", nameof(inputIds));
        using var scope = NewDisposeScope();
        var positions = arange(length, dtype: ScalarType.Int64, device: inputIds.device).unsqueeze(0);
        var h = _tokenEmbedding.call(inputIds) + _positionEmbedding.call(positions);
        return h.MoveToOuterDisposeScope();
    }
}

sealed class ClipEncoder : nn.Module<Tensor, IReadOnlyList<Tensor>>
{
    /// <summary>Children are registered explicitly under checkpoint names; TorchSharp's field-based registration would add them again under the C# field names.</summary>
    protected override void RegisterComponents() { }

    readonly ModuleList<ClipEncoderLayer> _layers;

    public ClipEncoder(ClipTextConfig c, Device? device, ScalarType? dtype) : base("encoder")
    {
        _layers = nn.ModuleList(Enumerable.Range(0, c.NumHiddenLayers).Select(_ => new ClipEncoderLayer(c, device, dtype)).ToArray());
        register_module("layers", _layers);
    }

    public override IReadOnlyList<Tensor> forward(Tensor h)
    {
        var states = new List<Tensor>(_layers.Count + 1) { h };
        foreach (var layer in _layers)
        {
            h = layer.call(h);
            states.Add(h);
        }
        return states;
    }
}

sealed class ClipEncoderLayer : nn.Module<Tensor, Tensor>
{
    /// <summary>Children are registered explicitly under checkpoint names; TorchSharp's field-based registration would add them again under the C# field names.</summary>
    protected override void RegisterComponents() { }

    readonly ClipAttention _selfAttn;
    readonly LayerNorm _layerNorm1;
    readonly ClipMlp _mlp;
    readonly LayerNorm _layerNorm2;

    public ClipEncoderLayer(ClipTextConfig c, Device? device, ScalarType? dtype) : base("layer")
    {
        _selfAttn = new ClipAttention(c, device, dtype);
        _layerNorm1 = Layers.LayerNorm(c.HiddenSize, c.LayerNormEps, device: device, dtype: dtype);
        _mlp = new ClipMlp(c, device, dtype);
        _layerNorm2 = Layers.LayerNorm(c.HiddenSize, c.LayerNormEps, device: device, dtype: dtype);
        register_module("self_attn", _selfAttn);
        register_module("layer_norm1", _layerNorm1);
        register_module("mlp", _mlp);
        register_module("layer_norm2", _layerNorm2);
    }

    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        var h = x + _selfAttn.call(_layerNorm1.call(x));
        h = h + _mlp.call(_layerNorm2.call(h));
        return h.MoveToOuterDisposeScope();
    }
}

/// <summary>Causal multi-head self-attention, scale head_dim^-0.5 (the SDPA default).</summary>
sealed class ClipAttention : nn.Module<Tensor, Tensor>
{
    /// <summary>Children are registered explicitly under checkpoint names; TorchSharp's field-based registration would add them again under the C# field names.</summary>
    protected override void RegisterComponents() { }

    readonly Linear _q, _k, _v, _out;
    readonly int _heads;

    public ClipAttention(ClipTextConfig c, Device? device, ScalarType? dtype) : base("self_attn")
    {
        _heads = c.NumAttentionHeads;
        _q = nn.Linear(c.HiddenSize, c.HiddenSize, device: device, dtype: dtype);
        _k = nn.Linear(c.HiddenSize, c.HiddenSize, device: device, dtype: dtype);
        _v = nn.Linear(c.HiddenSize, c.HiddenSize, device: device, dtype: dtype);
        _out = nn.Linear(c.HiddenSize, c.HiddenSize, device: device, dtype: dtype);
        register_module("q_proj", _q);
        register_module("k_proj", _k);
        register_module("v_proj", _v);
        register_module("out_proj", _out);
    }

    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        long b = x.shape[0], t = x.shape[1], d = x.shape[2];
        Tensor Heads(Tensor y) => y.view(b, t, _heads, d / _heads).transpose(1, 2);
        var q = Heads(_q.call(x));
        var k = Heads(_k.call(x));
        var v = Heads(_v.call(x));
        var a = nn.functional.scaled_dot_product_attention(q, k, v, is_casual: true);
        var o = _out.call(a.transpose(1, 2).reshape(b, t, d));
        return o.MoveToOuterDisposeScope();
    }
}

sealed class ClipMlp : nn.Module<Tensor, Tensor>
{
    /// <summary>Children are registered explicitly under checkpoint names; TorchSharp's field-based registration would add them again under the C# field names.</summary>
    protected override void RegisterComponents() { }

    readonly Linear _fc1, _fc2;
    readonly bool _quickGelu;

    public ClipMlp(ClipTextConfig c, Device? device, ScalarType? dtype) : base("mlp")
    {
        _quickGelu = c.HiddenAct == "quick_gelu";
        _fc1 = nn.Linear(c.HiddenSize, c.IntermediateSize, device: device, dtype: dtype);
        _fc2 = nn.Linear(c.IntermediateSize, c.HiddenSize, device: device, dtype: dtype);
        register_module("fc1", _fc1);
        register_module("fc2", _fc2);
    }

    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        var h = _fc1.call(x);
        h = _quickGelu ? h * nn.functional.sigmoid(1.702 * h) : nn.functional.gelu(h);
        return _fc2.call(h).MoveToOuterDisposeScope();
    }
}
