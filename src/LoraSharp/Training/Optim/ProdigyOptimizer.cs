using static TorchSharp.torch;

namespace LoraSharp.Training.Optim;

/// <summary>
/// Prodigy (Mishchenko &amp; Defazio 2023; prodigyopt 1.x): Adam whose step size d is estimated from the distance travelled,
/// d̂ = d_coef·Σ(d/d0)·dlr·⟨g, p0 − p⟩ / Σ|s| with s ← β3·s + (d/d0)·dlr·g, d = max(d, d̂) on the first growth, then
/// min(d_max, d·growth_rate); moments m ← β1·m + d(1−β1)·g, v ← β2·v + d²(1−β2)·g²; p ← p − dlr·m/(√v + d·eps).
/// Defaults: lr 1, β (0.9, 0.999), β3 = √β2, eps 1e-8, d0 1e-6, decoupled weight decay 0. The reference requires all
/// groups to share the learning rate; here a group with a different rate uses its own d·lr in its update and numerator.
/// </summary>
public sealed class ProdigyOptimizer : TrainingOptimizer
{
    readonly double _beta1, _beta2, _beta3, _eps, _d0, _dCoef, _growth;
    readonly bool _decouple, _biasCorrection, _safeguardWarmup;

    public ProdigyOptimizer(IReadOnlyList<ParamGroup> groups, (double, double) betas, double? beta3 = null, double eps = 1e-8, double weightDecay = 0,
        bool decouple = true, bool useBiasCorrection = false, bool safeguardWarmup = false, double d0 = 1e-6, double dCoef = 1.0,
        double growthRate = double.PositiveInfinity) : base(groups)
    {
        (_beta1, _beta2) = betas;
        _beta3 = beta3 ?? Math.Sqrt(_beta2);
        _eps = eps; _d0 = d0; _dCoef = dCoef; _growth = growthRate;
        _decouple = decouple; _biasCorrection = useBiasCorrection; _safeguardWarmup = safeguardWarmup;
        foreach (var g in groups) g.WeightDecay = weightDecay;
        Scalars["d"] = d0;
        Scalars["d_max"] = d0;
        Scalars["d_numerator"] = 0;
    }

    public override string Name => "Prodigy";

    /// <summary>The current step-size estimate d.</summary>
    public double D => Scalars["d"];

    protected override void StepCore()
    {
        double d = Scalars["d"], dMax = Scalars["d_max"];
        long k = StepCount;
        double bc = _biasCorrection ? Math.Sqrt(1 - Math.Pow(_beta2, k + 1)) / (1 - Math.Pow(_beta1, k + 1)) : 1;
        double dNumerator = Scalars["d_numerator"] * _beta3;
        double dDenom = 0;
        var items = WithGrads().ToList();
        foreach (var (g, i, group, p, grad) in items)
        {
            double groupLr = group.LearningRate;
            double dlr = d * groupLr * bc;
            var gr = grad.to_type(ScalarType.Float32);
            if (group.WeightDecay != 0 && !_decouple) gr = gr + p.to_type(ScalarType.Float32) * group.WeightDecay;
            var s = StateOf(g, i, "s", () => zeros([p.numel()], dtype: ScalarType.Float32));
            var p0 = StateOf(g, i, "p0", () => p.detach().flatten().to_type(ScalarType.Float32).clone());
            var m = StateOf(g, i, "exp_avg", () => zeros_like(p, dtype: ScalarType.Float32));
            var v = StateOf(g, i, "exp_avg_sq", () => zeros_like(p, dtype: ScalarType.Float32));
            if (groupLr <= 0) continue;
            var flatG = gr.flatten();
            dNumerator += d / _d0 * dlr * dot(flatG, p0 - p.flatten().to_type(ScalarType.Float32)).item<float>();
            m.mul_(_beta1).add_(gr, alpha: d * (1 - _beta1));
            v.mul_(_beta2).addcmul_(gr, gr, value: d * d * (1 - _beta2));
            s.mul_(_beta3).add_(flatG, alpha: _safeguardWarmup ? d / _d0 * d : d / _d0 * dlr);
            dDenom += s.abs().sum().item<float>();
        }
        if (dDenom == 0) return;
        double maxLr = Groups.Max(gr => gr.LearningRate);
        if (maxLr > 0)
        {
            double dHat = _dCoef * dNumerator / dDenom;
            if (d == _d0) d = Math.Max(d, dHat);
            dMax = Math.Max(dMax, dHat);
            d = Math.Min(dMax, d * _growth);
        }
        Scalars["d"] = d;
        Scalars["d_max"] = dMax;
        Scalars["d_numerator"] = dNumerator;
        foreach (var (g, i, group, p, _) in items)
        {
            double dlr = d * group.LearningRate * bc;
            var m = State[Key(g, i, "exp_avg")];
            var v = State[Key(g, i, "exp_avg_sq")];
            var denom = v.sqrt().add_(d * _eps);
            if (group.WeightDecay != 0 && _decouple) p.add_(p, alpha: -group.WeightDecay * dlr);
            p.sub_((m / denom * dlr).to_type(p.dtype));
        }
    }
}
