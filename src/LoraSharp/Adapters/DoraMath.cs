using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Adapters;

/// <summary>Over which axis a DoRA norm is taken.</summary>
public enum DoraAxis
{
    /// <summary>One norm per output row (PEFT, LyCORIS <c>wd_on_out=True</c>): magnitude [out] or dora_scale [out, 1(, 1, 1)].</summary>
    Output,
    /// <summary>One norm per input column (legacy LyCORIS): dora_scale [1, in(, 1, 1)].</summary>
    Input,
}

/// <summary>How a user multiplier m acts on a kohya/LyCORIS <c>dora_scale</c> adapter.</summary>
public enum DoraMultiplierRule
{
    /// <summary>A1111 / ComfyUI: W' = W + m·(Wc − W), Wc = (W+ΔW)·dora_scale/‖W+ΔW‖ (m = 0 gives the base).</summary>
    Interpolate,
    /// <summary>LyCORIS: W' = (W+ΔW)·(m·(dora_scale/‖W+ΔW‖ − 1) + 1) (ΔW itself is not scaled by m).</summary>
    LyCORIS,
}

/// <summary>
/// DoRA (weight-decomposed LoRA) as pure functions. Shapes: the weight <c>W</c> and delta <c>ΔW</c> as the layer's
/// weight; PEFT magnitude <c>[out]</c>; kohya/LyCORIS <c>dora_scale</c> <c>[out, 1(,1,1)]</c> or <c>[1, in(,1,1)]</c>.
/// </summary>
public static class DoraMath
{
    /// <summary>The axis of a dora_scale tensor, inferred from its shape as ComfyUI does (dim 0 = out ⇒ output axis).</summary>
    public static DoraAxis InferAxis(long[] doraScaleShape, long[] weightShape)
    {
        if (doraScaleShape.Length >= 1 && doraScaleShape[0] == weightShape[0] && doraScaleShape.Skip(1).All(s => s == 1))
            return DoraAxis.Output;
        if (doraScaleShape.Length >= 2 && doraScaleShape[0] == 1 && doraScaleShape[1] == weightShape[1] && doraScaleShape.Skip(2).All(s => s == 1))
            return DoraAxis.Input;
        throw new ArgumentException($"dora_scale shape [{string.Join(", ", doraScaleShape)}] fits neither axis of a weight [{string.Join(", ", weightShape)}] (expected [{weightShape[0]}, 1, …] or [1, {weightShape[1]}, …]).");
    }

    /// <summary>The norm of W per output row or per input column, shaped to broadcast against W (keepdim).</summary>
    public static Tensor Norm(Tensor w, DoraAxis axis, double eps = 0)
    {
        using var scope = NewDisposeScope();
        long[] dims = axis == DoraAxis.Output
            ? [.. Enumerable.Range(1, (int)w.dim() - 1).Select(i => (long)i)]
            : [0, .. Enumerable.Range(2, (int)w.dim() - 2).Select(i => (long)i)];
        var n = w.square().sum(dims, keepdim: true).sqrt();
        if (eps != 0) n = n.add(eps);
        return n.MoveToOuterDisposeScope();
    }

    /// <summary>The magnitude/scale tensor reshaped to broadcast against W along the axis.</summary>
    public static Tensor Broadcastable(Tensor magnitude, DoraAxis axis, long[] weightShape)
    {
        long[] shape = new long[weightShape.Length];
        Array.Fill(shape, 1L);
        if (axis == DoraAxis.Output) shape[0] = weightShape[0]; else shape[1] = weightShape[1];
        return magnitude.reshape(shape);
    }

    /// <summary>W' = magnitude · (W + ΔW) / ‖W + ΔW‖ (ΔW already scaled). PEFT merge when axis = Output.</summary>
    public static Tensor MergedWeight(Tensor weight, Tensor scaledDelta, Tensor magnitude, DoraAxis axis, double eps = 0, bool detachNorm = false)
    {
        using var scope = NewDisposeScope();
        var v = weight.add(scaledDelta);
        var n = Norm(v, axis, eps);
        if (detachNorm) n = n.detach();
        return v.mul(Broadcastable(magnitude, axis, weight.shape).div(n)).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// The effective weight change of a DoRA adapter at multiplier m.
    /// PEFT (magnitude vector): m scales the LoRA part inside the decomposition (PEFT <c>set_scale</c>):
    /// W' = mag·(W + m·ΔW)/‖W + m·ΔW‖. kohya/LyCORIS (dora_scale): per <paramref name="rule"/>.
    /// </summary>
    public static Tensor EffectiveDelta(Tensor weight, Tensor scaledDelta, Tensor magnitude, DoraAxis axis, double multiplier,
        bool peftStyle, DoraMultiplierRule rule = DoraMultiplierRule.Interpolate, double eps = 0, bool detachNorm = false)
    {
        using var scope = NewDisposeScope();
        Tensor result;
        if (peftStyle)
            result = MergedWeight(weight, scaledDelta.mul(multiplier), magnitude, axis, eps, detachNorm).sub(weight);
        else
        {
            var v = weight.add(scaledDelta);
            var n = Norm(v, axis, eps);
            if (detachNorm) n = n.detach();
            var ratio = Broadcastable(magnitude, axis, weight.shape).div(n);
            result = rule == DoraMultiplierRule.Interpolate
                ? v.mul(ratio).sub(weight).mul(multiplier)
                : v.mul(ratio.sub(1).mul(multiplier).add(1)).sub(weight);
        }
        return result.MoveToOuterDisposeScope();
    }

    /// <summary>The machine epsilon LyCORIS adds to the norm for a dtype.</summary>
    public static double Epsilon(ScalarType dtype) => dtype switch
    {
        ScalarType.Float16 => 9.765625e-4,
        ScalarType.BFloat16 => 7.8125e-3,
        ScalarType.Float64 => 2.220446049250313e-16,
        _ => 1.1920928955078125e-7,
    };
}
