using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace LoraSharp.Models.Llama;

/// <summary>
/// The decoder stack (HF <c>LlamaModel</c>, checkpoint prefix <c>model.</c>): <c>embed_tokens</c>,
/// <c>layers.{i}</c>, <c>norm</c>. Input: token ids <c>[batch, seq]</c>, the KV cache (or null) and an optional
/// padding mask; output: the final-normed hidden states <c>[batch, seq, hidden]</c>.
/// </summary>
public sealed class LlamaModel : nn.Module<Tensor, KvCache?, Tensor?, Tensor>
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

    /// <param name="inputIds"><c>[batch, seq]</c> int64; with a cache, only the positions not yet seen.</param>
    /// <param name="cache">Past keys/values, extended by this call; null to attend within the call only.</param>
    /// <param name="attentionMask">
    /// HF <c>attention_mask</c> <c>[batch, past+seq]</c>, 1 for real tokens and 0 for padding (left or right), or null
    /// when no row is padded. Padding keys are never attended and positions count real tokens only
    /// (<c>position = cumsum(mask) - 1</c>, as HF generate does for left padding).
    /// </param>
    public override Tensor forward(Tensor inputIds, KvCache? cache, Tensor? attentionMask)
    {
        using var scope = NewDisposeScope();
        long batch = inputIds.shape[0], seq = inputIds.shape[1], past = cache?.Length ?? 0;
        var hidden = EmbedTokens.call(inputIds);
        var device = hidden.device;

        Tensor cos, sin;
        Tensor? causal, sliding;
        int? window = _config.SlidingWindow is int w && past + seq > w ? w : null;
        if (attentionMask is null)
        {
            (cos, sin) = Rotary.CosSin(past, seq, hidden.dtype, device);
            // Within one call without past keys a plain causal mask suffices (SDPA is_causal); otherwise build it.
            causal = past > 0 && seq > 1 ? AttentionMask(past, seq, null, device) : null;
            sliding = window is null ? causal : AttentionMask(past, seq, window, device);
        }
        else
        {
            if (attentionMask.dim() != 2 || attentionMask.shape[0] != batch || attentionMask.shape[1] != past + seq)
                throw new ArgumentException($"attention mask must be [batch, past+seq] = [{batch}, {past + seq}], got [{string.Join(", ", attentionMask.shape)}]", nameof(attentionMask));
            var keep = attentionMask.to(device).to_type(ScalarType.Int64);
            var positions = (keep.cumsum(-1) - 1).clamp_min(0).narrow(1, past, seq);
            (cos, sin) = Rotary.CosSin(positions, past + seq, hidden.dtype);
            var keys = keep.to_type(ScalarType.Bool).view(batch, 1, 1, past + seq);
            causal = PaddedMask(AttentionMask(past, seq, null, device), keys);
            sliding = window is null ? causal : PaddedMask(AttentionMask(past, seq, window, device), keys);
        }

        var ctx = new LlamaForwardContext { Cos = cos, Sin = sin, CausalMask = causal, SlidingMask = sliding, Cache = cache };
        return RunLayers(hidden, ctx).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// Runs each decoder layer: <c>(layer, hidden, ctx) → hidden</c>. Null (default) calls <c>layer.call(hidden, ctx)</c>;
    /// training sets it to recompute layers in backward (gradient checkpointing).
    /// </summary>
    public Func<LlamaDecoderLayer, Tensor, LlamaForwardContext, Tensor>? LayerRunner { get; set; }

    Tensor RunLayers(Tensor hidden, LlamaForwardContext ctx)
    {
        var runner = LayerRunner;
        foreach (var layer in Layers)
            hidden = runner is null ? layer.call(hidden, ctx) : runner(layer, hidden, ctx);
        return Norm.call(hidden);
    }

    /// <summary>
    /// Forward pass over packed rows (several samples back to back, no cache): <paramref name="positionIds"/>
    /// <c>[batch, seq]</c> are the RoPE positions (restarting at 0 for each sample) and <paramref name="sampleMask"/>
    /// <c>[batch, seq, seq]</c> is a boolean mask replacing the causal one (true = query i may attend key j; it must be
    /// causal itself, e.g. block-diagonal causal, and every row needs at least one true).
    /// </summary>
    public Tensor ForwardPacked(Tensor inputIds, Tensor positionIds, Tensor sampleMask)
    {
        using var scope = NewDisposeScope();
        long seq = inputIds.shape[1];
        if (positionIds.shape[0] != inputIds.shape[0] || positionIds.shape[1] != seq)
            throw new ArgumentException($"position ids must be [batch, seq] like the input ids, got [{string.Join(", ", positionIds.shape)}]", nameof(positionIds));
        if (sampleMask.dim() != 3 || sampleMask.shape[1] != seq || sampleMask.shape[2] != seq)
            throw new ArgumentException($"sample mask must be [batch, seq, seq], got [{string.Join(", ", sampleMask.shape)}]", nameof(sampleMask));
        var hidden = EmbedTokens.call(inputIds);
        var device = hidden.device;
        var pos = positionIds.to(device).to_type(ScalarType.Int64);
        long maxPos = pos.numel() == 0 ? 0 : pos.max().item<long>();
        var (cos, sin) = Rotary.CosSin(pos, maxPos + 1, hidden.dtype);
        var causal = sampleMask.to(device).to_type(ScalarType.Bool).unsqueeze(1);
        var sliding = causal;
        if (_config.SlidingWindow is int w)
            sliding = causal.logical_and((pos.unsqueeze(1) > pos.unsqueeze(2) - w).unsqueeze(1));
        var ctx = new LlamaForwardContext { Cos = cos, Sin = sin, CausalMask = causal, SlidingMask = sliding, Cache = null };
        return RunLayers(hidden, ctx).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// <c>[batch, 1, seq, past+seq]</c>: the causal/window rule and a real (non-padding) key. A query row left with no
    /// key (a left-padding position) may attend everything, so it gives finite garbage instead of NaN (HF does the same).
    /// </summary>
    static Tensor PaddedMask(Tensor causal, Tensor keys)
    {
        using var scope = NewDisposeScope();
        var mask = causal.unsqueeze(0).unsqueeze(0).logical_and(keys);
        return mask.logical_or(mask.any(-1, keepdim: true).logical_not()).MoveToOuterDisposeScope();
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
