using LoraSharp.Models.Llama;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Training.Llm;

/// <summary>
/// Gradient checkpointing for the Llama decoder (TorchSharp has no <c>torch.utils.checkpoint</c>): each decoder
/// layer runs under no_grad in the forward pass, keeping only its input; in the backward pass the layer is run again
/// under enable_grad from the saved input (with the RNG state of the first run, so dropout masks repeat) and its
/// graph is back-propagated, which fills the adapter gradients and gives the input's gradient.
/// </summary>
public static class LlmGradientCheckpoint
{
    /// <summary>Turns checkpointing on or off for <paramref name="model"/>.</summary>
    public static void Set(LlamaForCausalLM model, bool enabled) => model.Model.LayerRunner = enabled ? Run : null;

    /// <summary>The layer runner: checkpointed when gradients are being recorded, a plain call otherwise.</summary>
    public static Tensor Run(LlamaDecoderLayer layer, Tensor x, LlamaForwardContext ctx)
    {
        if (!torch.is_grad_enabled() || ctx.Cache is not null) return layer.call(x, ctx);
        // The first layer's input (frozen embeddings) needs no gradient, but the function's output must carry one so
        // the backward pass reaches the adapters inside: make the input a leaf that requires grad (as HF's
        // enable_input_require_grads does); its gradient is computed and dropped.
        if (!x.requires_grad) x = x.detach().requires_grad_(true);
        return CheckpointFunction.apply(x, layer, ctx);
    }

    sealed class CheckpointFunction : torch.autograd.SingleTensorFunction<CheckpointFunction>
    {
        public override string Name => "LlamaLayerCheckpoint";

        public override Tensor forward(torch.autograd.AutogradContext ctx, params object[] vars)
        {
            var x = (Tensor)vars[0];
            var layer = (LlamaDecoderLayer)vars[1];
            var lctx = (LlamaForwardContext)vars[2];
            // The context's tensors belong to the model's forward scope: keep them alive as saved variables.
            var saved = new List<Tensor> { x, lctx.Cos, lctx.Sin };
            if (lctx.CausalMask is not null) saved.Add(lctx.CausalMask);
            if (lctx.SlidingMask is not null) saved.Add(lctx.SlidingMask);
            ctx.save_for_backward(saved);
            ctx.save_data("layer", layer);
            ctx.save_data("causal", lctx.CausalMask is not null);
            ctx.save_data("sliding", lctx.SlidingMask is not null);
            ctx.save_data("rng", torch.random.get_rng_state().DetachFromDisposeScope());
            using var noGrad = torch.no_grad();
            return layer.call(x, lctx);
        }

        public override List<Tensor> backward(torch.autograd.AutogradContext ctx, Tensor grad)
        {
            var saved = ctx.get_saved_variables();
            var layer = (LlamaDecoderLayer)ctx.get_data("layer");
            bool hasCausal = (bool)ctx.get_data("causal"), hasSliding = (bool)ctx.get_data("sliding");
            int k = 3;
            var causal = hasCausal ? saved[k++] : null;
            var sliding = hasSliding ? saved[k] : null;
            var lctx = new LlamaForwardContext { Cos = saved[1], Sin = saved[2], CausalMask = causal, SlidingMask = sliding, Cache = null };
            using var rng = (Tensor)ctx.get_data("rng");
            using var current = torch.random.get_rng_state();
            torch.random.set_rng_state(rng);
            Tensor inputGrad;
            try
            {
                using var enable = torch.enable_grad();
                using var scope = NewDisposeScope();
                var x = saved[0].detach().requires_grad_(true);
                var y = layer.call(x, lctx);
                y.backward([grad]);
                inputGrad = x.grad!.clone().MoveToOuterDisposeScope();
            }
            finally
            {
                torch.random.set_rng_state(current);
            }
            return [inputGrad, null!, null!]; // one entry per forward argument (layer and context get none)
        }
    }
}
