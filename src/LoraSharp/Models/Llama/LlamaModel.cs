using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace LoraSharp.Models.Llama;

/// <summary>
/// The decoder stack (HF <c>LlamaModel</c>, checkpoint prefix <c>model.</c>): <c>embed_tokens</c>,
/// <c>layers.{i}</c>, <c>norm</c>. Input: token ids <c>[batch, seq]</c> (equal-length rows, no padding);
/// output: the final-normed hidden states <c>[batch, seq, hidden]</c>.
/// </summary>
public sealed class LlamaModel : nn.Module<Tensor, KvCache?, Tensor>
{
    readonly LlamaConfig _config;

    public Embedding EmbedTokens { get; }
    public ModuleList<LlamaDecoderLayer> Layers { get; }
    public RmsNorm Norm { get; }
    public RotaryEmbedding Rotary { get; }

    public LlamaModel(LlamaConfig config, LlamaWeights weights) : base(nameof(LlamaModel))
    {
        _config = config;
        EmbedTokens = nn.Embedding(config.VocabSize, config.HiddenSize, device: new Device(DeviceType.META), dtype: weights.DType);
        EmbedTokens.weight = weights.Matrix(config.VocabSize, config.HiddenSize);
        Layers = new ModuleList<LlamaDecoderLayer>(
            Enumerable.Range(0, config.NumHiddenLayers).Select(i => new LlamaDecoderLayer(config, i, weights)).ToArray());
        Norm = new RmsNorm(weights.Ones(config.HiddenSize), config.RmsNormEps);
        Rotary = new RotaryEmbedding(config);
        register_module("embed_tokens", EmbedTokens);
        register_module("layers", Layers);
        register_module("norm", Norm);
    }

    /// <summary>Children are registered explicitly under their checkpoint names; no reflection over fields.</summary>
    protected override void RegisterComponents() { }

    public override Tensor forward(Tensor inputIds, KvCache? cache) => Forward(inputIds, cache, null, null);

    /// <summary>
    /// Runs each decoder layer: <c>(layer, hidden, ctx) → hidden</c>. Null (default) calls <c>layer.call(hidden, ctx)</c>;
    /// training sets it to recompute layers in backward (gradient checkpointing).
    /// </summary>
    public Func<LlamaDecoderLayer, Tensor, LlamaForwardContext, Tensor>? LayerRunner { get; set; }

    /// <summary>
    /// The forward pass with optional per-token <paramref name="positionIds"/> <c>[batch, seq]</c> (RoPE positions, e.g.
    /// restarting at 0 for each sample packed into a row) and an optional boolean <paramref name="attentionMask"/>
    /// <c>[batch, seq, seq]</c> (true = query i may attend key j; it replaces the causal mask, so it must be causal
    /// itself, e.g. block-diagonal causal for packed samples). Both need <paramref name="cache"/> = null.
    /// </summary>
    public Tensor Forward(Tensor inputIds, KvCache? cache, Tensor? positionIds, Tensor? attentionMask)
    {
        using var scope = NewDisposeScope();
        long seq = inputIds.shape[1], past = cache?.Length ?? 0;
        if ((positionIds is not null || attentionMask is not null) && cache is not null)
            throw new ArgumentException("position ids and attention masks are supported without a KV cache only");
        var hidden = EmbedTokens.call(inputIds);
        Tensor cos, sin;
        if (positionIds is null)
            (cos, sin) = Rotary.CosSin(past, seq, hidden.dtype, hidden.device);
        else
            (cos, sin) = Rotary.CosSin(positionIds.to(hidden.device), hidden.dtype);

        Tensor? causal, sliding;
        if (attentionMask is not null)
        {
            causal = attentionMask.to(ScalarType.Bool).to(hidden.device).unsqueeze(1);
            sliding = causal;
            if (_config.SlidingWindow is int w)
            {
                var pos = positionIds ?? torch.arange(seq, dtype: ScalarType.Int64, device: hidden.device).unsqueeze(0);
                pos = pos.to(hidden.device);
                sliding = causal.logical_and((pos.unsqueeze(1) > pos.unsqueeze(2) - w).unsqueeze(1));
            }
        }
        else
        {
            // Within one call without past keys a plain causal mask suffices (SDPA is_causal); otherwise build it.
            causal = past > 0 && seq > 1 ? AttentionMask(past, seq, null, hidden.device) : null;
            sliding = causal;
            if (_config.SlidingWindow is int window && past + seq > window)
                sliding = AttentionMask(past, seq, window, hidden.device);
        }

        var ctx = new LlamaForwardContext { Cos = cos, Sin = sin, CausalMask = causal, SlidingMask = sliding, Cache = cache };
        var runner = LayerRunner;
        foreach (var layer in Layers)
            hidden = runner is null ? layer.call(hidden, ctx) : runner(layer, hidden, ctx);
        return Norm.call(hidden).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// Boolean <c>[seq, past+seq]</c>: query i (position past+i) may attend key j when j ≤ past+i and, with a window w,
    /// j &gt; past+i-w (HF's sliding-window rule).
    /// </summary>
    public static Tensor AttentionMask(long past, long seq, int? window, Device device)
    {
        using var scope = NewDisposeScope();
        var queryPos = torch.arange(past, past + seq, dtype: ScalarType.Int64, device: device).unsqueeze(1);
        var keyPos = torch.arange(0, past + seq, dtype: ScalarType.Int64, device: device).unsqueeze(0);
        var mask = keyPos <= queryPos;
        if (window is int w)
            mask = mask.logical_and(keyPos > queryPos - w);
        return mask.MoveToOuterDisposeScope();
    }
}
