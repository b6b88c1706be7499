using TorchSharp;
using static TorchSharp.torch;
using static TorchSharp.torch.autograd;

namespace LoraSharp.Training;

/// <summary>
/// The autograd node of gradient checkpointing (TorchSharp has no <c>torch.utils.checkpoint</c>), shared by the UNet
/// (<see cref="Diffusion.GradientCheckpointing"/>) and the Llama decoder (<see cref="Llm.LlmGradientCheckpoint"/>).
/// The caller runs a block under no_grad, so none of its activations are kept, and passes the output here with the
/// block's inputs; the node's backward runs the block again from the saved inputs with autograd on — with the torch
/// RNG state of the first run, so dropout masks repeat — and back-propagates the output gradient through it: into the
/// (adapter) parameters inside the block and to each input that requires a gradient. Only the inputs (and the tensors
/// in <c>keepAlive</c>) stay alive between forward and backward.
/// </summary>
public static class Recompute
{
    /// <summary>The current torch RNG state, as plain bytes (take it just before running the block).</summary>
    public static byte[] RngState()
    {
        using var state = random.get_rng_state();
        return state.bytes.ToArray();
    }

    /// <summary>
    /// Returns <paramref name="output"/> (the block's result, computed under no_grad) as the output of a recompute node.
    /// <paramref name="block"/> gets the saved inputs (detached, requiring grad as the originals did) and the saved
    /// <paramref name="keepAlive"/> tensors (context the block reads, e.g. masks, that the caller's dispose scope may
    /// free before backward) and must compute the same output. When no input requires a gradient (frozen layers before
    /// the block), the first input is replaced by a leaf copy that does, so autograd still creates the node and the
    /// backward pass reaches the parameters inside (HF's <c>enable_input_require_grads</c>); its gradient is dropped.
    /// </summary>
    public static Tensor Apply(Tensor output, Func<IReadOnlyList<Tensor>, IReadOnlyList<Tensor>, Tensor> block, byte[] rngState,
        IReadOnlyList<Tensor> inputs, IReadOnlyList<Tensor>? keepAlive = null)
    {
        if (inputs.Count == 0) throw new ArgumentException("a recomputed block needs at least one input", nameof(inputs));
        var args = new object[inputs.Count + 1];
        args[0] = new Call(block, rngState, output, inputs.Count, keepAlive ?? []);
        for (int i = 0; i < inputs.Count; i++) args[i + 1] = inputs[i];
        if (!inputs.Any(t => t.requires_grad)) args[1] = inputs[0].detach().requires_grad_(true);
        return Node.apply(args);
    }

    sealed record Call(Func<IReadOnlyList<Tensor>, IReadOnlyList<Tensor>, Tensor> Block, byte[] Rng, Tensor Output, int Inputs, IReadOnlyList<Tensor> KeepAlive);

    sealed class Node : SingleTensorFunction<Node>
    {
        public override string Name => "LoraSharpRecompute";

        public override Tensor forward(AutogradContext ctx, params object[] vars)
        {
            var call = (Call)vars[0];
            var saved = new List<Tensor>(call.Inputs + call.KeepAlive.Count);
            for (int i = 0; i < call.Inputs; i++) saved.Add((Tensor)vars[i + 1]);
            saved.AddRange(call.KeepAlive);
            ctx.save_for_backward(saved);
            ctx.save_data("call", call with { Output = null!, KeepAlive = [] });
            return call.Output;
        }

        public override List<Tensor> backward(AutogradContext ctx, Tensor gradOutput)
        {
            var call = (Call)ctx.get_data("call");
            var saved = ctx.get_saved_variables();
            var grads = new List<Tensor> { null! }; // one entry per argument of apply: none for the call
            using var rng = tensor(call.Rng, dtype: ScalarType.Byte);
            using var current = random.get_rng_state();
            random.set_rng_state(rng);
            try
            {
                using var enable = enable_grad();
                using var scope = NewDisposeScope();
                var inputs = saved.Take(call.Inputs).Select(t => t.detach().requires_grad_(t.requires_grad)).ToList();
                var output = call.Block(inputs, saved.Skip(call.Inputs).ToList());
                if (output.requires_grad) output.backward([gradOutput]);
                foreach (var x in inputs)
                    grads.Add(x.requires_grad ? (x.grad is { } g ? g.clone() : zeros_like(x)).MoveToOuterDisposeScope() : null!);
            }
            finally
            {
                random.set_rng_state(current);
            }
            return grads;
        }
    }
}
