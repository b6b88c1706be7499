using static TorchSharp.torch;

namespace LoraSharp.Training.Optim;

/// <summary>
/// Lion (Chen et al. 2023; lion-pytorch, which kohya uses): p ← p·(1 − lr·wd); u = sign(β1·m + (1 − β1)·g);
/// p ← p − lr·u; m ← β2·m + (1 − β2)·g. Defaults β = (0.9, 0.99), wd 0. Use a learning rate 3–10× smaller than AdamW's.
/// </summary>
public sealed class LionOptimizer : TrainingOptimizer
{
    readonly double _beta1, _beta2;

    public LionOptimizer(IReadOnlyList<ParamGroup> groups, (double, double) betas, double weightDecay = 0) : base(groups)
    {
        (_beta1, _beta2) = betas;
        foreach (var g in groups) g.WeightDecay = weightDecay;
    }

    public override string Name => "Lion";

    protected override void StepCore()
    {
        foreach (var (g, i, group, p, grad) in WithGrads())
        {
            double lr = group.LearningRate;
            var gr = grad.to_type(ScalarType.Float32);
            var m = StateOf(g, i, "exp_avg", () => zeros_like(p, dtype: ScalarType.Float32));
            if (group.WeightDecay != 0) p.mul_(1 - lr * group.WeightDecay);
            var update = (m * _beta1 + gr * (1 - _beta1)).sign_();
            p.sub_((update * lr).to_type(p.dtype));
            m.mul_(_beta2).add_(gr, alpha: 1 - _beta2);
        }
    }
}
