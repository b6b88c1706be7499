using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace LoraSharp.Models.Llama;

/// <summary>
/// What every layer of one forward pass shares: RoPE cos/sin for the new positions, the attention masks, and the
/// KV cache (null: attend within this call only).
/// </summary>
public sealed class LlamaForwardContext
{
    public required Tensor Cos { get; init; }
    public required Tensor Sin { get; init; }
    /// <summary>Boolean mask <c>[new, past+new]</c> (true = may attend) for full-causal layers; null = plain causal within the call.</summary>
    public Tensor? CausalMask { get; init; }
    /// <summary>Boolean mask for sliding-window layers; null when the model has none.</summary>
    public Tensor? SlidingMask { get; init; }
    public KvCache? Cache { get; init; }
}

/// <summary>
/// Multi-head self-attention with grouped-query heads (query head h reads kv head h / (heads / kv_heads)),
/// optional q/k/v/o biases, RoPE, and a causal or sliding-window mask. Submodules: q_proj, k_proj, v_proj, o_proj.
/// </summary>
public sealed class LlamaAttention : nn.Module<Tensor, LlamaForwardContext, Tensor>
{
    readonly int _layer, _heads, _kvHeads, _headDim;
    readonly bool _sliding;

    public Linear QProj { get; }
    public Linear KProj { get; }
    public Linear VProj { get; }
    public Linear OProj { get; }

    public LlamaAttention(LlamaConfig config, int layer, LlamaWeights weights) : base(nameof(LlamaAttention))
    {
        _layer = layer;
        _heads = config.NumAttentionHeads;
        _kvHeads = config.NumKeyValueHeads;
        _headDim = config.HeadDim;
        _sliding = config.UsesSlidingWindow(layer);
        long h = config.HiddenSize;
        QProj = weights.Linear(h, _heads * _headDim, config.AttentionBias);
        KProj = weights.Linear(h, _kvHeads * _headDim, config.AttentionBias);
        VProj = weights.Linear(h, _kvHeads * _headDim, config.AttentionBias);
        OProj = weights.Linear(_heads * _headDim, h, config.OutputProjectionBias);
        register_module("q_proj", QProj);
        register_module("k_proj", KProj);
        register_module("v_proj", VProj);
        register_module("o_proj", OProj);
    }

    /// <summary>Children are registered explicitly under their checkpoint names; no reflection over fields.</summary>
    protected override void RegisterComponents() { }

    /// <summary><paramref name="x"/> <c>[batch, seq, hidden]</c> → <c>[batch, seq, hidden]</c> (after o_proj).</summary>
    public override Tensor forward(Tensor x, LlamaForwardContext ctx)
    {
        using var scope = NewDisposeScope();
        long batch = x.shape[0], seq = x.shape[1];

        // [batch, seq, heads*d] -> [batch, heads, seq, d]
        var q = QProj.call(x).view(batch, seq, _heads, _headDim).transpose(1, 2);
        var k = KProj.call(x).view(batch, seq, _kvHeads, _headDim).transpose(1, 2);
        var v = VProj.call(x).view(batch, seq, _kvHeads, _headDim).transpose(1, 2);

        q = RotaryEmbedding.Apply(q, ctx.Cos, ctx.Sin);
        k = RotaryEmbedding.Apply(k, ctx.Cos, ctx.Sin);

        if (ctx.Cache is not null)
            (k, v) = ctx.Cache.Append(_layer, k, v);

        var groups = _heads / _kvHeads;
        if (groups > 1)
        {
            k = k.repeat_interleave(groups, dim: 1);
            v = v.repeat_interleave(groups, dim: 1);
        }

        // SDPA's default scale is 1/sqrt(head_dim), what Llama uses. A mask is needed when keys include past
        // positions or a sliding window applies; otherwise plain causal attention within the call.
        var mask = _sliding ? ctx.SlidingMask : ctx.CausalMask;
        var attended = mask is null
            ? nn.functional.scaled_dot_product_attention(q, k, v, is_casual: seq > 1)
            : nn.functional.scaled_dot_product_attention(q, k, v, attn_mask: mask);

        var merged = attended.transpose(1, 2).reshape(batch, seq, _heads * _headDim);
        return OProj.call(merged).MoveToOuterDisposeScope();
    }
}
