using LoraSharp.Quantization;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace LoraSharp.Training.Optim;

/// <summary>
/// An optimizer over named parameters whose state lives in tensors it owns (created once, updated in place under
/// no_grad, so a training step allocates only temporaries that die in its dispose scope). The state can be saved and
/// restored exactly (checkpoints, resume).
/// </summary>
public interface ITrainingOptimizer : IDisposable
{
    /// <summary>Learning rate of the next <see cref="Step"/> (set by the scheduler).</summary>
    double LearningRate { get; set; }

    /// <summary>Optimizer steps taken so far (the bias-correction step count).</summary>
    long StepCount { get; }

    /// <summary>One update from the parameters' current <c>.grad</c> (parameters without a gradient are skipped).</summary>
    void Step();

    /// <summary>Sets every gradient to zero (keeps the gradient tensors).</summary>
    void ZeroGrad();

    /// <summary>The state tensors by name ("&lt;param&gt;/exp_avg", …) plus the step in "step" (int64 scalar).</summary>
    IReadOnlyDictionary<string, Tensor> State();

    /// <summary>Restores what <see cref="State"/> returned (copied into the owned tensors).</summary>
    void LoadState(IReadOnlyDictionary<string, Tensor> state);

    /// <summary>Bytes of all state tensors.</summary>
    long StateBytes { get; }
}

/// <summary>Hyper-parameters shared by the AdamW variants (PyTorch defaults).</summary>
public sealed record AdamWOptions
{
    public double LearningRate { get; init; } = 1e-3;
    public double Beta1 { get; init; } = 0.9;
    public double Beta2 { get; init; } = 0.999;
    public double Epsilon { get; init; } = 1e-8;
    /// <summary>Decoupled weight decay λ: p ← p·(1 − lr·λ) before the Adam update.</summary>
    public double WeightDecay { get; init; } = 0.01;
}

/// <summary>Common parts of the AdamW variants.</summary>
public abstract class AdamWBase : ITrainingOptimizer
{
    protected readonly IReadOnlyList<(string Name, Parameter Param)> Params;
    protected readonly AdamWOptions Options;

    protected AdamWBase(IEnumerable<(string Name, Parameter Param)> parameters, AdamWOptions options)
    {
        Params = parameters.ToList();
        if (Params.Select(p => p.Name).Distinct().Count() != Params.Count) throw new ArgumentException("parameter names must be unique");
        Options = options;
        LearningRate = options.LearningRate;
    }

    public double LearningRate { get; set; }
    public long StepCount { get; protected set; }
    public abstract long StateBytes { get; }

    public void ZeroGrad()
    {
        using var _ = no_grad();
        foreach (var (_, p) in Params) p.grad?.zero_();
    }

    public void Step()
    {
        using var _ = no_grad();
        StepCount++;
        double bc1 = 1 - Math.Pow(Options.Beta1, StepCount), bc2 = 1 - Math.Pow(Options.Beta2, StepCount);
        for (int i = 0; i < Params.Count; i++)
        {
            var p = Params[i].Param;
            var g = p.grad;
            if (g is null) continue;
            using var scope = NewDisposeScope();
            if (Options.WeightDecay != 0) p.mul_(1 - LearningRate * Options.WeightDecay);
            Update(i, p, g.dtype == ScalarType.Float32 ? g : g.to_type(ScalarType.Float32), bc1, bc2);
        }
    }

    /// <summary>Updates moments of parameter <paramref name="i"/> and applies p ← p − lr·m̂/(√v̂ + ε).</summary>
    protected abstract void Update(int i, Parameter p, Tensor g, double bc1, double bc2);

    /// <summary>The AdamW update with fp32 moments m, v (already in place).</summary>
    protected void Apply(Parameter p, Tensor m, Tensor v, Tensor g, double bc1, double bc2)
    {
        m.mul_(Options.Beta1).add_(g, alpha: 1 - Options.Beta1);
        v.mul_(Options.Beta2).addcmul_(g, g, value: 1 - Options.Beta2);
        var denom = v.sqrt().div_(Math.Sqrt(bc2)).add_(Options.Epsilon);
        if (p.dtype == ScalarType.Float32) p.addcdiv_(m, denom, value: -LearningRate / bc1);
        else p.copy_(p.to_type(ScalarType.Float32).addcdiv_(m, denom, value: -LearningRate / bc1));
    }

    public abstract IReadOnlyDictionary<string, Tensor> State();
    public abstract void LoadState(IReadOnlyDictionary<string, Tensor> state);
    public abstract void Dispose();

    protected static Tensor Need(IReadOnlyDictionary<string, Tensor> state, string key) =>
        state.TryGetValue(key, out var t) ? t : throw new LoraSharpException($"optimizer state has no '{key}'", key: key);
}

/// <summary>
/// AdamW (Loshchilov &amp; Hutter; PyTorch <c>torch.optim.AdamW</c> semantics, no amsgrad): fp32 first and second
/// moments per parameter, bias correction, decoupled weight decay.
/// </summary>
public sealed class AdamW : AdamWBase
{
    readonly Tensor[] _m, _v;

    public AdamW(IEnumerable<(string Name, Parameter Param)> parameters, AdamWOptions options) : base(parameters, options)
    {
        _m = Params.Select(p => torch.zeros(p.Param.shape, dtype: ScalarType.Float32, device: p.Param.device).DetachFromDisposeScope()).ToArray();
        _v = Params.Select(p => torch.zeros(p.Param.shape, dtype: ScalarType.Float32, device: p.Param.device).DetachFromDisposeScope()).ToArray();
    }

    public override long StateBytes => _m.Sum(t => t.numel() * 4) * 2;

    protected override void Update(int i, Parameter p, Tensor g, double bc1, double bc2) => Apply(p, _m[i], _v[i], g, bc1, bc2);

    public override IReadOnlyDictionary<string, Tensor> State()
    {
        var d = new Dictionary<string, Tensor> { ["step"] = torch.tensor(StepCount) };
        for (int i = 0; i < Params.Count; i++)
        {
            d[Params[i].Name + "/exp_avg"] = _m[i];
            d[Params[i].Name + "/exp_avg_sq"] = _v[i];
        }
        return d;
    }

    public override void LoadState(IReadOnlyDictionary<string, Tensor> state)
    {
        using var _ = no_grad();
        for (int i = 0; i < Params.Count; i++)
        {
            _m[i].copy_(Need(state, Params[i].Name + "/exp_avg"));
            _v[i].copy_(Need(state, Params[i].Name + "/exp_avg_sq"));
        }
        StepCount = Need(state, "step").item<long>();
    }

    public override void Dispose()
    {
        foreach (var t in _m.Concat(_v)) t.Dispose();
    }
}

/// <summary>
/// 8-bit AdamW (bitsandbytes' blockwise 8-bit optimizer idea): both moments are stored as one byte per value —
/// blockwise (256 values per block) absmax scaling with the 8-bit dynamic tree code (<see cref="DynamicCode8"/>;
/// signed code for the first moment, the unsigned variant for the second). Each step dequantizes a parameter's
/// moments to fp32, applies the AdamW update, and quantizes them back. State: ≈2·(1 + 4/256) bytes per parameter
/// instead of 8.
/// </summary>
public sealed class AdamW8Bit : AdamWBase
{
    public const int BlockSize = 256;

    sealed class Moment(Tensor codes, Tensor absmax)
    {
        public readonly Tensor Codes = codes;   // uint8 [padded]
        public readonly Tensor Absmax = absmax; // float32 [blocks]
    }

    readonly Moment[] _m, _v;
    readonly Tensor _signed, _unsigned, _signedMid, _unsignedMid;

    public AdamW8Bit(IEnumerable<(string Name, Parameter Param)> parameters, AdamWOptions options) : base(parameters, options)
    {
        var device = Params.Count > 0 ? Params[0].Param.device : torch.CPU;
        _signed = torch.tensor(DynamicCode8.Signed, device: device).DetachFromDisposeScope();
        _unsigned = torch.tensor(DynamicCode8.Unsigned, device: device).DetachFromDisposeScope();
        _signedMid = torch.tensor(DynamicCode8.Midpoints(DynamicCode8.Signed), device: device).DetachFromDisposeScope();
        _unsignedMid = torch.tensor(DynamicCode8.Midpoints(DynamicCode8.Unsigned), device: device).DetachFromDisposeScope();
        _m = Params.Select(p => NewMoment(p.Param, Array.IndexOf(DynamicCode8.Signed, 0f))).ToArray();
        _v = Params.Select(p => NewMoment(p.Param, Array.IndexOf(DynamicCode8.Unsigned, 0f))).ToArray();
    }

    /// <summary>A zero moment: every code is the index of the code's 0 value.</summary>
    static Moment NewMoment(Parameter p, int zeroIndex)
    {
        long blocks = (p.numel() + BlockSize - 1) / BlockSize;
        var codes = torch.full([blocks * BlockSize], zeroIndex, dtype: ScalarType.Byte, device: p.device).DetachFromDisposeScope();
        var absmax = torch.zeros([blocks], dtype: ScalarType.Float32, device: p.device).DetachFromDisposeScope();
        return new Moment(codes, absmax);
    }

    public override long StateBytes => _m.Concat(_v).Sum(m => m.Codes.numel() + m.Absmax.numel() * 4);

    Tensor Dequant(Moment s, Tensor code, long n, long[] shape) =>
        code.index_select(0, s.Codes.to_type(ScalarType.Int64)).view(-1, BlockSize).mul(s.Absmax.unsqueeze(1)).view(-1).narrow(0, 0, n).view(shape);

    void Quant(Moment s, Tensor values, Tensor mid)
    {
        long n = values.numel(), padded = s.Codes.numel();
        var flat = values.reshape(-1);
        if (padded > n) flat = torch.cat([flat, torch.zeros([padded - n], dtype: flat.dtype, device: flat.device)]);
        var blocks = flat.view(-1, BlockSize);
        var absmax = blocks.abs().amax([1L]);
        var normalized = blocks.div(absmax.clamp_min(1e-30f).unsqueeze(1));
        s.Codes.copy_(torch.bucketize(normalized.reshape(-1), mid).to_type(ScalarType.Byte));
        s.Absmax.copy_(absmax);
    }

    protected override void Update(int i, Parameter p, Tensor g, double bc1, double bc2)
    {
        long n = p.numel();
        var m = Dequant(_m[i], _signed, n, p.shape);
        var v = Dequant(_v[i], _unsigned, n, p.shape);
        Apply(p, m, v, g, bc1, bc2);
        Quant(_m[i], m, _signedMid);
        Quant(_v[i], v, _unsignedMid);
    }

    public override IReadOnlyDictionary<string, Tensor> State()
    {
        var d = new Dictionary<string, Tensor> { ["step"] = torch.tensor(StepCount) };
        for (int i = 0; i < Params.Count; i++)
        {
            d[Params[i].Name + "/exp_avg.codes"] = _m[i].Codes;
            d[Params[i].Name + "/exp_avg.absmax"] = _m[i].Absmax;
            d[Params[i].Name + "/exp_avg_sq.codes"] = _v[i].Codes;
            d[Params[i].Name + "/exp_avg_sq.absmax"] = _v[i].Absmax;
        }
        return d;
    }

    public override void LoadState(IReadOnlyDictionary<string, Tensor> state)
    {
        using var _ = no_grad();
        for (int i = 0; i < Params.Count; i++)
        {
            _m[i].Codes.copy_(Need(state, Params[i].Name + "/exp_avg.codes"));
            _m[i].Absmax.copy_(Need(state, Params[i].Name + "/exp_avg.absmax"));
            _v[i].Codes.copy_(Need(state, Params[i].Name + "/exp_avg_sq.codes"));
            _v[i].Absmax.copy_(Need(state, Params[i].Name + "/exp_avg_sq.absmax"));
        }
        StepCount = Need(state, "step").item<long>();
    }

    public override void Dispose()
    {
        foreach (var m in _m.Concat(_v)) { m.Codes.Dispose(); m.Absmax.Dispose(); }
        _signed.Dispose(); _unsigned.Dispose(); _signedMid.Dispose(); _unsignedMid.Dispose();
    }
}

/// <summary>Global-norm gradient clipping (PyTorch <c>clip_grad_norm_</c>).</summary>
public static class GradientClipping
{
    /// <summary>Scales all gradients by min(1, max/(‖g‖ + 1e-6)); returns the norm before clipping.</summary>
    public static double ClipByGlobalNorm(IEnumerable<Parameter> parameters, double maxNorm)
    {
        using var _ = no_grad();
        using var scope = NewDisposeScope();
        var grads = parameters.Select(p => p.grad).Where(g => g is not null).Select(g => g!).ToList();
        if (grads.Count == 0) return 0;
        var total = torch.stack(grads.Select(g => g.to_type(ScalarType.Float32).norm()).ToArray()).norm().item<float>();
        if (maxNorm > 0 && double.IsFinite(total))
        {
            double coef = Math.Min(1.0, maxNorm / (total + 1e-6));
            if (coef < 1.0) foreach (var g in grads) g.mul_(coef);
        }
        return total;
    }
}
