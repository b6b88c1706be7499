using LoraSharp.Models.StableDiffusion;
using TorchSharp;
using static TorchSharp.torch;
using static TorchSharp.torch.autograd;

namespace LoraSharp.Training.Diffusion;

/// <summary>
/// Gradient checkpointing of the UNet's ResnetBlock2D and Transformer2DModel blocks without touching the model code:
/// a forward pre-hook switches autograd off for the block (so none of its activations are kept), and a forward hook
/// wraps the output in a custom autograd function whose backward re-runs the block's <c>forward</c> with autograd on
/// (and the torch RNG state of the first run, so dropouts repeat) and back-propagates through it — into the adapter
/// parameters inside the block and into the block's inputs. Only block inputs and outputs stay alive between forward
/// and backward (diffusers' / kohya's checkpointing granularity).
/// </summary>
public sealed class GradientCheckpointing : IDisposable
{
    readonly List<IDisposable> _handles = [];

    sealed class HookHandle(Action remove) : IDisposable
    {
        public void Dispose() => remove();
    }

    /// <summary>Per-call state passed from the pre-hook to the forward hook and on to backward.</summary>
    internal sealed class Call
    {
        public required Func<Tensor, Tensor?, Tensor> Forward { get; init; }
        public IDisposable? Guard { get; set; }
        public Tensor? RngState { get; set; }
        public Tensor? Output { get; set; }
    }

    /// <summary>Number of blocks wrapped.</summary>
    public int Blocks { get; private set; }

    /// <summary>Hooks every ResnetBlock2D and Transformer2DModel of the UNet; dispose to remove.</summary>
    public static GradientCheckpointing Apply(UNet2DConditionModel unet)
    {
        var gc = new GradientCheckpointing();
        foreach (var (_, m) in unet.named_modules())
        {
            if (m is ResnetBlock2D r) gc.Wrap(r, (x, t) => r.forward(x, t));
            else if (m is Transformer2DModel tr) gc.Wrap(tr, (x, c) => tr.forward(x, c!));
        }
        return gc;
    }

    void Wrap<TB>(nn.Module<Tensor, TB, Tensor> module, Func<Tensor, Tensor?, Tensor> forward) where TB : Tensor?
    {
        var stack = new Stack<Call>();
        var pre = module.register_forward_pre_hook((m, a, b) =>
        {
            if (!is_grad_enabled()) { stack.Push(new Call { Forward = forward }); return null; }
            var call = new Call { Forward = forward, RngState = get_rng_state().DetachFromDisposeScope() };
            call.Guard = no_grad();
            stack.Push(call);
            return null;
        });
        var post = module.register_forward_hook((m, a, b, output) =>
        {
            var call = stack.Pop();
            if (call.Guard is null) return output;
            call.Guard.Dispose();
            call.Guard = null;
            call.Output = output;
            // With frozen layers before the block (conv_in, time embedding) no input requires grad and autograd would not
            // create the node at all (the reentrant-checkpoint pitfall): feed a leaf copy that does.
            bool anyGrad = a.requires_grad || (b is Tensor bt && bt.requires_grad);
            var first = anyGrad ? a : a.detach().requires_grad_(true);
            return CheckpointFunction.apply(call, first, b);
        });
        _handles.Add(new HookHandle(() => { pre.remove(); post.remove(); }));
        Blocks++;
    }

    public void Dispose()
    {
        foreach (var h in _handles) h.Dispose();
        _handles.Clear();
    }

    /// <summary>Custom autograd node: forward returns the no-grad output; backward recomputes the block with grad.</summary>
    sealed class CheckpointFunction : SingleTensorFunction<CheckpointFunction>
    {
        public override string Name => "LoraSharpCheckpoint";

        public override Tensor forward(AutogradContext ctx, params object[] vars)
        {
            var call = (Call)vars[0];
            var a = (Tensor)vars[1];
            var b = vars[2] as Tensor;
            ctx.save_data("call", call);
            ctx.save_data("has_b", b is not null);
            ctx.save_for_backward(b is null ? [a] : [a, b]);
            var output = call.Output!;
            call.Output = null;
            return output;
        }

        public override List<Tensor> backward(AutogradContext ctx, Tensor gradOutput)
        {
            var call = (Call)ctx.get_data("call");
            bool hasB = (bool)ctx.get_data("has_b");
            var saved = ctx.get_saved_variables();
            var a = saved[0].detach().requires_grad_(saved[0].requires_grad);
            var b = hasB ? saved[1].detach().requires_grad_(saved[1].requires_grad) : null;
            var rngNow = get_rng_state();
            try
            {
                if (call.RngState is not null) set_rng_state(call.RngState);
                using (var _ = enable_grad())
                {
                    var output = call.Forward(a, b);
                    if (output.requires_grad) output.backward([gradOutput]);
                    output.Dispose();
                }
            }
            finally
            {
                set_rng_state(rngNow);
                rngNow.Dispose();
            }
            // one gradient per argument of apply(call, a, b): none for the call object
            return [null!, a.grad ?? zeros_like(a), hasB ? b!.grad ?? zeros_like(b!) : null!];
        }
    }
}
