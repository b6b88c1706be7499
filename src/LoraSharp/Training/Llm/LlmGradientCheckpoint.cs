using LoraSharp.Models.Llama;
using static TorchSharp.torch;

namespace LoraSharp.Training.Llm;

/// <summary>
/// Gradient checkpointing for the Llama decoder: each decoder layer runs under no_grad in the forward pass, keeping
/// only its input (and the rotary tables and masks it reads); the backward pass runs the layer again with autograd on
/// (<see cref="Recompute"/>: same RNG state, so dropout masks repeat) and back-propagates through it, which fills the
/// adapter gradients and gives the input's gradient.
/// </summary>
public static class LlmGradientCheckpoint
{
    /// <summary>Turns checkpointing on or off for <paramref name="model"/>.</summary>
    public static void Set(LlamaForCausalLM model, bool enabled) => model.Model.LayerRunner = enabled ? Run : null;

    /// <summary>The layer runner: checkpointed when gradients are being recorded, a plain call otherwise.</summary>
    public static Tensor Run(LlamaDecoderLayer layer, Tensor x, LlamaForwardContext ctx)
    {
        if (!is_grad_enabled() || ctx.Cache is not null) return layer.call(x, ctx);
        // The context's tensors belong to the model's forward scope: the node keeps them alive as saved variables, and
        // the recomputation rebuilds the context from those.
        var kept = new List<Tensor> { ctx.Cos, ctx.Sin };
        if (ctx.CausalMask is not null) kept.Add(ctx.CausalMask);
        if (ctx.SlidingMask is not null) kept.Add(ctx.SlidingMask);
        bool hasCausal = ctx.CausalMask is not null, hasSliding = ctx.SlidingMask is not null;
        var rng = Recompute.RngState();
        Tensor y;
        using (no_grad()) y = layer.call(x, ctx);
        return Recompute.Apply(y, (inputs, k) =>
        {
            int i = 2;
            var again = new LlamaForwardContext
            {
                Cos = k[0], Sin = k[1], CausalMask = hasCausal ? k[i++] : null, SlidingMask = hasSliding ? k[i] : null, Cache = null,
            };
            return layer.call(inputs[0], again);
        }, rng, [x], kept);
    }
}
