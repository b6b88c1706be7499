using static TorchSharp.torch;

namespace LoraSharp.Training.Optim;

/// <summary>
/// Adafactor (Shazeer &amp; Stern 2018; the transformers implementation kohya uses). Second moment factored into row and
/// column means for tensors of rank ≥ 2 (over the last two dims), β2_t = 1 − t^decay_rate, update = g/√v̂ clipped to
/// RMS ≤ clip_threshold, step size = lr (or with relative_step min(1e-2, 1/√t); warmup_init 1e-6·t) × max(eps2, RMS(p))
/// when scale_parameter; optional first moment β1 and decoupled weight decay. Defaults are transformers': relative_step
/// and scale_parameter on (the scheduled learning rate is then ignored — pass relative_step=False to use it).
/// </summary>
public sealed class AdafactorOptimizer : TrainingOptimizer
{
    readonly double _eps1, _eps2, _clip, _decay;
    readonly double? _beta1;
    readonly bool _scaleParameter, _relativeStep, _warmupInit;

    public AdafactorOptimizer(IReadOnlyList<ParamGroup> groups, double eps1 = 1e-30, double eps2 = 1e-3, double clipThreshold = 1.0, double decayRate = -0.8,
        double? beta1 = null, double weightDecay = 0, bool scaleParameter = true, bool relativeStep = true, bool warmupInit = false) : base(groups)
    {
        _eps1 = eps1; _eps2 = eps2; _clip = clipThreshold; _decay = decayRate; _beta1 = beta1;
        _scaleParameter = scaleParameter; _relativeStep = relativeStep; _warmupInit = warmupInit;
        if (warmupInit && !relativeStep) throw new LoraSharpException("Adafactor warmup_init=True needs relative_step=True", key: "optimizer_args");
        foreach (var g in groups) g.WeightDecay = weightDecay;
    }

    public override string Name => "Adafactor";

    static Tensor Rms(Tensor t) => t.norm() / Math.Sqrt(t.numel());

    /// <summary>The step size of a parameter at step t (1-based).</summary>
    public double StepSize(double groupLr, long t, double paramRms)
    {
        double rel = groupLr;
        if (_relativeStep)
        {
            double minStep = _warmupInit ? 1e-6 * t : 1e-2;
            rel = Math.Min(minStep, 1.0 / Math.Sqrt(t));
        }
        double scale = _scaleParameter ? Math.Max(_eps2, paramRms) : 1.0;
        return scale * rel;
    }

    protected override void StepCore()
    {
        long t = StepCount + 1;
        double beta2t = 1.0 - Math.Pow(t, _decay);
        foreach (var (g, i, group, p, grad) in WithGrads())
        {
            var gr = grad.to_type(ScalarType.Float32);
            var pf = p.to_type(ScalarType.Float32);
            bool factored = p.dim() >= 2;
            double lr = StepSize(group.LearningRate, t, Rms(pf).item<float>());
            var sq = gr * gr + _eps1;
            Tensor update;
            if (factored)
            {
                var shape = p.shape;
                var row = StateOf(g, i, "exp_avg_sq_row", () => zeros(shape[..^1], dtype: ScalarType.Float32));
                var col = StateOf(g, i, "exp_avg_sq_col", () => zeros([.. shape[..^2], shape[^1]], dtype: ScalarType.Float32));
                row.mul_(beta2t).add_(sq.mean([-1]), alpha: 1 - beta2t);
                col.mul_(beta2t).add_(sq.mean([-2]), alpha: 1 - beta2t);
                var rFactor = (row / row.mean([-1], keepdim: true)).rsqrt().unsqueeze(-1);
                var cFactor = col.unsqueeze(-2).rsqrt();
                update = rFactor * cFactor * gr;
            }
            else
            {
                var v = StateOf(g, i, "exp_avg_sq", () => zeros_like(p, dtype: ScalarType.Float32));
                v.mul_(beta2t).add_(sq, alpha: 1 - beta2t);
                update = v.rsqrt() * gr;
            }
            update = update / (Rms(update) / _clip).clamp_min(1.0);
            update = update * lr;
            if (_beta1 is { } b1)
            {
                var m = StateOf(g, i, "exp_avg", () => zeros_like(p, dtype: ScalarType.Float32));
                m.mul_(b1).add_(update, alpha: 1 - b1);
                update = m;
            }
            if (group.WeightDecay != 0) p.add_(p, alpha: -group.WeightDecay * lr);
            p.sub_(update.to_type(p.dtype));
        }
    }
}
