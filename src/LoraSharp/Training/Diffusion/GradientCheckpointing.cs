using LoraSharp.Models.StableDiffusion;
using static TorchSharp.torch;

namespace LoraSharp.Training.Diffusion;

/// <summary>
/// Gradient checkpointing of the UNet's ResnetBlock2D and Transformer2DModel blocks without touching the model code:
/// a forward pre-hook switches autograd off for the block (so none of its activations are kept) and takes the RNG
/// state, and a forward hook hands the output to <see cref="Recompute"/>, whose backward re-runs the block's
/// <c>forward</c> with autograd on and back-propagates through it — into the adapter parameters inside the block and
/// into the block's inputs. Only block inputs and outputs stay alive between forward and backward (diffusers' /
/// kohya's checkpointing granularity).
/// </summary>
public sealed class GradientCheckpointing : IDisposable
{
    readonly List<IDisposable> _handles = [];

    sealed class HookHandle(Action remove) : IDisposable
    {
        public void Dispose() => remove();
    }

    /// <summary>Per-call state passed from the pre-hook to the forward hook: the no_grad guard and the RNG state (null when autograd was off anyway).</summary>
    sealed record Call(IDisposable? Guard, byte[]? Rng);

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
            if (!is_grad_enabled()) { stack.Push(new Call(null, null)); return null; }
            var rng = Recompute.RngState();
            stack.Push(new Call(no_grad(), rng));
            return null;
        });
        var post = module.register_forward_hook((m, a, b, output) =>
        {
            var call = stack.Pop();
            if (call.Guard is null) return output;
            call.Guard.Dispose();
            return Recompute.Apply(output, (inputs, _) => forward(inputs[0], inputs.Count > 1 ? inputs[1] : null), call.Rng!,
                b is Tensor bt ? [a, bt] : [a]);
        });
        _handles.Add(new HookHandle(() => { pre.remove(); post.remove(); }));
        Blocks++;
    }

    public void Dispose()
    {
        foreach (var h in _handles) h.Dispose();
        _handles.Clear();
    }
}
