using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Models.Llama;

/// <summary>
/// One pre-norm block: <c>h = x + self_attn(input_layernorm(x))</c>, <c>out = h + mlp(post_attention_layernorm(h))</c>.
/// </summary>
public sealed class LlamaDecoderLayer : nn.Module<Tensor, LlamaForwardContext, Tensor>
{
    public RmsNorm InputLayerNorm { get; }
    public LlamaAttention SelfAttention { get; }
    public RmsNorm PostAttentionLayerNorm { get; }
    public LlamaMlp Mlp { get; }

    public LlamaDecoderLayer(LlamaConfig config, int layer, LlamaWeights weights) : base(nameof(LlamaDecoderLayer))
    {
        SelfAttention = new LlamaAttention(config, layer, weights);
        Mlp = new LlamaMlp(config, weights);
        InputLayerNorm = new RmsNorm(weights.Ones(config.HiddenSize), config.RmsNormEps);
        PostAttentionLayerNorm = new RmsNorm(weights.Ones(config.HiddenSize), config.RmsNormEps);
        register_module("self_attn", SelfAttention);
        register_module("mlp", Mlp);
        register_module("input_layernorm", InputLayerNorm);
        register_module("post_attention_layernorm", PostAttentionLayerNorm);
    }

    /// <summary>Children are registered explicitly under their checkpoint names; no reflection over fields.</summary>
    protected override void RegisterComponents() { }

    public override Tensor forward(Tensor x, LlamaForwardContext ctx)
    {
        using var scope = NewDisposeScope();
        var h = x + SelfAttention.call(InputLayerNorm.call(x), ctx);
        return (h + Mlp.call(PostAttentionLayerNorm.call(h))).MoveToOuterDisposeScope();
    }
}
