using static TorchSharp.torch;

namespace LoraSharp.Training.Optim;

/// <summary>
/// AdamW (torch.optim.AdamW semantics: decoupled decay p ← p·(1 − lr·wd), bias-corrected moments,
/// p ← p − lr·m̂/(√v̂ + eps)). With <c>eightBit</c> the moments are stored in 8 bits per element, in blocks of 256 with a
/// float32 absmax per block and power-law companding (m: signed, |m|/absmax = (q/127)²; v: unsigned,
/// v/absmax = (q/255)⁴), so small entries keep their relative precision; this is LoraSharp's own 8-bit scheme, not
/// bitsandbytes' dynamic map. The update itself is computed in float32.
/// </summary>
public sealed class AdamWOptimizer : TrainingOptimizer
{
    public const int BlockSize = 256;
    readonly double _beta1, _beta2, _eps;
    readonly bool _eightBit;

    public AdamWOptimizer(IReadOnlyList<ParamGroup> groups, (double, double) betas, double eps = 1e-8, double weightDecay = 0.01, bool eightBit = false) : base(groups)
    {
        (_beta1, _beta2) = betas;
        _eps = eps;
        _eightBit = eightBit;
        foreach (var g in groups) g.WeightDecay = weightDecay;
    }

    public override string Name => _eightBit ? "AdamW8bit" : "AdamW";

    protected override void StepCore()
    {
        long t = StepCount + 1;
        double bc1 = 1 - Math.Pow(_beta1, t), bc2 = 1 - Math.Pow(_beta2, t);
        foreach (var (g, i, group, p, grad) in WithGrads())
        {
            double lr = group.LearningRate;
            var gr = grad.to_type(ScalarType.Float32);
            Tensor m, v;
            if (_eightBit)
            {
                m = Dequantize(g, i, "exp_avg", p.numel(), signed: true).reshape(p.shape);
                v = Dequantize(g, i, "exp_avg_sq", p.numel(), signed: false).reshape(p.shape);
            }
            else
            {
                m = StateOf(g, i, "exp_avg", () => zeros_like(p, dtype: ScalarType.Float32));
                v = StateOf(g, i, "exp_avg_sq", () => zeros_like(p, dtype: ScalarType.Float32));
            }
            m.mul_(_beta1).add_(gr, alpha: 1 - _beta1);
            v.mul_(_beta2).addcmul_(gr, gr, value: 1 - _beta2);
            if (group.WeightDecay != 0) p.mul_(1 - lr * group.WeightDecay);
            var denom = (v / bc2).sqrt_().add_(_eps);
            p.sub_((m / bc1 / denom * lr).to_type(p.dtype));
            if (_eightBit)
            {
                Quantize(g, i, "exp_avg", m, signed: true);
                Quantize(g, i, "exp_avg_sq", v, signed: false);
            }
        }
    }

    Tensor Dequantize(int g, int i, string name, long numel, bool signed)
    {
        long blocks = (numel + BlockSize - 1) / BlockSize;
        var q = StateOf(g, i, name + ".q", () => zeros([blocks * BlockSize], dtype: signed ? ScalarType.Int8 : ScalarType.Byte));
        var scale = StateOf(g, i, name + ".absmax", () => zeros([blocks, 1], dtype: ScalarType.Float32));
        var x = q.to_type(ScalarType.Float32).reshape(blocks, BlockSize);
        var y = signed ? (x / 127.0).abs().pow(2) * (x.sign()) * scale : (x / 255.0).pow(4) * scale;
        return y.flatten()[..(int)numel];
    }

    void Quantize(int g, int i, string name, Tensor value, bool signed)
    {
        var q = State[Key(g, i, name + ".q")];
        var scale = State[Key(g, i, name + ".absmax")];
        long blocks = scale.shape[0];
        var flat = value.flatten();
        long pad = blocks * BlockSize - flat.numel();
        if (pad > 0) flat = nn.functional.pad(flat, [0, pad]);
        var x = flat.reshape(blocks, BlockSize);
        var absmax = x.abs().amax([1], keepdim: true);
        var safe = absmax.clamp_min(1e-30);
        var r = (x.abs() / safe);
        var code = signed ? (r.sqrt() * 127.0).round() * x.sign() : (r.pow(0.25) * 255.0).round();
        q.copy_(code.flatten().to_type(q.dtype));
        scale.copy_(absmax);
    }
}
