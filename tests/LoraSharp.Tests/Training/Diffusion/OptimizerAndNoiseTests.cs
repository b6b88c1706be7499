using LoraSharp.Training.Diffusion;
using LoraSharp.Training.Optim;
using TorchSharp;
using Parameter = TorchSharp.Modules.Parameter;
using ParamGroup = LoraSharp.Training.Optim.ParamGroup;
using static TorchSharp.torch;

namespace LoraSharp.Tests.Training.Diffusion;

public class OptimizerAndNoiseTests
{
    static Parameter P(params float[] v) => new(tensor(v));

    static void SetGrad(Parameter p, params float[] g)
    {
        p.grad?.Dispose();
        p.grad = tensor(g);
    }

    static void Close(double[] expected, Tensor actual, double tol = 1e-6)
    {
        var a = actual.detach().to_type(ScalarType.Float64).data<double>().ToArray();
        Assert.Equal(expected.Length, a.Length);
        for (int i = 0; i < a.Length; i++) Assert.True(Math.Abs(expected[i] - a[i]) <= tol * Math.Max(1, Math.Abs(expected[i])), $"[{i}] expected {expected[i]:R}, got {a[i]:R}");
    }

    [Fact]
    public void Lion_two_steps_match_the_hand_computation()
    {
        var p = P(1f, -2f);
        using var opt = new LionOptimizer([new ParamGroup("g", [p], 0.1)], (0.9, 0.99), weightDecay: 0.01);
        SetGrad(p, 0.5f, -0.1f);
        opt.Step();
        Close([0.999 - 0.1, -1.998 + 0.1], p);
        SetGrad(p, -1f, 0.2f);
        opt.Step();
        // m = 0.01·g1 = [0.005, -0.001]; u = sign(0.9·m + 0.1·g2) = [-1, +1]
        Close([(0.999 - 0.1) * 0.999 + 0.1, (-1.998 + 0.1) * 0.999 - 0.1], p);
    }

    [Fact]
    public void AdamW_first_step_is_lr_times_sign_after_decay()
    {
        var p = P(1f, -2f, 0.5f);
        using var opt = new AdamWOptimizer([new ParamGroup("g", [p], 0.1)], (0.9, 0.999), 1e-8, 0.01);
        SetGrad(p, 0.3f, -4f, 0f);
        opt.Step();
        Close([1 * 0.999 - 0.1 * 0.3 / (0.3 + 1e-8), -2 * 0.999 + 0.1 * 4 / (4 + 1e-8), 0.5 * 0.999], p, 1e-6);
    }

    /// <summary>
    /// Updates of 1e-3 on values near 1 are below bfloat16's resolution (2⁻⁷): a bf16 parameter updated directly would
    /// never move. Through its float32 master the bf16 parameter follows the float32 trajectory, rounded; the master is
    /// part of the saved state, so a restored optimizer continues exactly.
    /// </summary>
    [Theory]
    [InlineData("AdamW")]
    [InlineData("Lion")]
    [InlineData("Prodigy")]
    public void Bf16_parameters_are_updated_through_float32_master_weights(string kind)
    {
        float[] init = [1f, -1f, 0.5f, 2f];
        var p32 = new Parameter(tensor(init));
        var p16 = new Parameter(tensor(init).to_type(ScalarType.BFloat16));
        GroupedOptimizer Make(Parameter p) => kind switch
        {
            "AdamW" => new AdamWOptimizer([new ParamGroup("g", [p], 1e-3)], (0.9, 0.999), weightDecay: 0),
            "Lion" => new LionOptimizer([new ParamGroup("g", [p], 1e-3)], (0.9, 0.99)),
            _ => new ProdigyOptimizer([new ParamGroup("g", [p], 1.0)], (0.9, 0.999)),
        };
        using var o32 = Make(p32);
        using var o16 = Make(p16);
        for (int step = 0; step < 10; step++)
        {
            float[] g = [0.5f, -0.25f, 1f, 0.125f * (step % 3 - 1)];
            SetGrad(p32, g);
            p16.grad?.Dispose();
            p16.grad = tensor(g).to_type(ScalarType.BFloat16);
            o32.Step();
            o16.Step();
        }
        Assert.True((p32 - tensor(init)).abs().max().item<float>() > 5e-3, "the float32 run barely moved");
        // the bf16 parameter is the float32 trajectory rounded to bf16
        var expected = p32.detach().to_type(ScalarType.BFloat16);
        Assert.True((p16.detach() == expected).all().item<bool>(), $"bf16 {string.Join(", ", p16.detach().to_type(ScalarType.Float32).data<float>().ToArray())} vs rounded f32 {string.Join(", ", expected.to_type(ScalarType.Float32).data<float>().ToArray())}");
        Assert.Contains(o16.StateDict().Tensors.Keys, k => k.EndsWith(".master", StringComparison.Ordinal));
        Assert.DoesNotContain(o32.StateDict().Tensors.Keys, k => k.EndsWith(".master", StringComparison.Ordinal));
    }

    [Fact]
    public void AdamW8bit_tracks_full_precision_AdamW_with_a_quarter_of_the_state()
    {
        manual_seed(1);
        var init = randn(1000);
        var p32 = new Parameter(init.clone());
        var p8 = new Parameter(init.clone());
        using var a32 = new AdamWOptimizer([new ParamGroup("g", [p32], 0.01)], (0.9, 0.999));
        using var a8 = new AdamWOptimizer([new ParamGroup("g", [p8], 0.01)], (0.9, 0.999), eightBit: true);
        for (int s = 0; s < 20; s++)
        {
            var g = randn(1000) * (1 + s % 3);
            p32.grad = g.clone();
            p8.grad = g.clone();
            a32.Step();
            a8.Step();
        }
        var move32 = (p32 - init).norm().item<float>();
        var diff = (p32 - p8).norm().item<float>();
        Assert.True(diff < 0.05 * move32, $"8-bit drift {diff} vs movement {move32}");
        Assert.True(a8.StateBytes < a32.StateBytes / 3, $"{a8.StateBytes} vs {a32.StateBytes}");
        Assert.Equal("AdamW8bit", a8.Name);
    }

    /// <summary>Prodigy written out with scalars (prodigyopt 1.x, defaults) for a single parameter vector.</summary>
    static double[] ProdigyByHand(double[] p, double[][] grads, double lr)
    {
        double b1 = 0.9, b2 = 0.999, b3 = Math.Sqrt(b2), eps = 1e-8, d0 = 1e-6, d = d0, dMax = d0, num = 0;
        int n = p.Length;
        var p0 = (double[])p.Clone();
        var m = new double[n]; var v = new double[n]; var s = new double[n];
        foreach (var g in grads)
        {
            double dlr = d * lr;
            num *= b3;
            double den = 0;
            for (int i = 0; i < n; i++)
            {
                num += d / d0 * dlr * g[i] * (p0[i] - p[i]);
                m[i] = b1 * m[i] + d * (1 - b1) * g[i];
                v[i] = b2 * v[i] + d * d * (1 - b2) * g[i] * g[i];
                s[i] = b3 * s[i] + d / d0 * dlr * g[i];
            }
            for (int i = 0; i < n; i++) den += Math.Abs(s[i]);
            double dHat = num / den;
            if (d == d0) d = Math.Max(d, dHat);
            dMax = Math.Max(dMax, dHat);
            d = Math.Min(dMax, d * double.PositiveInfinity);
            dlr = d * lr;
            for (int i = 0; i < n; i++) p[i] -= dlr * m[i] / (Math.Sqrt(v[i]) + d * eps);
        }
        return p;
    }

    [Fact]
    public void Prodigy_three_steps_match_the_hand_computation()
    {
        var p = P(1f, -2f, 0.5f);
        using var opt = new ProdigyOptimizer([new ParamGroup("g", [p], 1.0)], (0.9, 0.999));
        double[][] grads = [[0.3, -4, 1], [0.2, -3, -1], [0.25, -2, 0.5]];
        foreach (var g in grads)
        {
            SetGrad(p, g.Select(x => (float)x).ToArray());
            opt.Step();
        }
        Close(ProdigyByHand([1, -2, 0.5], grads, 1.0), p, 2e-5);
        Assert.True(opt.D >= 1e-6);
    }

    [Fact]
    public void Adafactor_vector_and_factored_steps_match_the_hand_computation()
    {
        // vector, fixed lr, no parameter scaling: first step β2t = 0 → update = g/|g| = sign(g), RMS 1, clip 0.5 halves it
        var v = P(1f, -2f);
        using (var opt = new AdafactorOptimizer([new ParamGroup("g", [v], 0.1)], clipThreshold: 0.5, scaleParameter: false, relativeStep: false))
        {
            SetGrad(v, 0.3f, -4f);
            opt.Step();
        }
        Close([1 - 0.05, -2 + 0.05], v);

        // 2×2 matrix: row/col means of g², r = (row/mean(row))^-½, c = col^-½, u = r·c·g; RMS(u) > 1 → u/RMS(u)
        var w = new Parameter(tensor(new float[] { 1, 2, 3, 4 }).reshape(2, 2));
        double[] g = [0.1, 0.2, 0.3, 0.4];
        using (var opt = new AdafactorOptimizer([new ParamGroup("g", [w], 0.5)], scaleParameter: false, relativeStep: false))
        {
            w.grad = tensor(g.Select(x => (float)x).ToArray()).reshape(2, 2);
            opt.Step();
        }
        double[] sq = g.Select(x => x * x + 1e-30).ToArray();
        double[] row = [(sq[0] + sq[1]) / 2, (sq[2] + sq[3]) / 2];
        double[] col = [(sq[0] + sq[2]) / 2, (sq[1] + sq[3]) / 2];
        double rowMean = (row[0] + row[1]) / 2;
        var u = new double[4];
        for (int i = 0; i < 2; i++) for (int j = 0; j < 2; j++) u[i * 2 + j] = 1 / Math.Sqrt(row[i] / rowMean) / Math.Sqrt(col[j]) * g[i * 2 + j];
        double rms = Math.Sqrt(u.Sum(x => x * x) / 4);
        double[] expected = new double[4];
        for (int k = 0; k < 4; k++) expected[k] = (k + 1) - 0.5 * u[k] / Math.Max(1, rms);
        Close(expected, w.flatten(), 1e-5);

        // relative step with parameter scaling: step size = min(1e-2, 1/√1) · max(1e-3, RMS(p))
        using var opt3 = new AdafactorOptimizer([new ParamGroup("g", [P(3f, 4f)], 0.5)]);
        Assert.Equal(0.01 * Math.Sqrt(12.5), opt3.StepSize(0.5, 1, Math.Sqrt(12.5)), 12);
    }

    [Fact]
    public void Optimizer_state_round_trips_through_its_state_dict()
    {
        var p = P(1f, 2f);
        using var a = new AdamWOptimizer([new ParamGroup("g", [p], 0.1)], (0.9, 0.999));
        SetGrad(p, 1f, -1f);
        a.Step();
        var (tensors, scalars) = a.StateDict();
        var q = P(1f, 2f);
        using var b = new AdamWOptimizer([new ParamGroup("g", [q], 0.1)], (0.9, 0.999));
        b.LoadStateDict(tensors, scalars);
        Assert.Equal(1, b.StepCount);
        using (no_grad()) q.copy_(p);
        SetGrad(p, 0.5f, 0.5f); SetGrad(q, 0.5f, 0.5f);
        a.Step(); b.Step();
        Assert.Equal(p.data<float>().ToArray(), q.data<float>().ToArray());
        Assert.Throws<LoraSharpException>(() => new LionOptimizer([new ParamGroup("g", [q], 0.1)], (0.9, 0.99)).LoadStateDict(tensors, scalars));
    }

    [Fact]
    public void Optimizer_factory_reads_kohya_names_and_rejects_unknown_args()
    {
        var p = P(1f);
        using var o = OptimizerFactory.Create("adamw8bit", [new ParamGroup("g", [p], 1e-4)], ["weight_decay=0.1", "betas=0.9,0.99"]);
        Assert.Equal("AdamW8bit", o.Name);
        Assert.Equal(0.1, o.Groups[0].WeightDecay);
        var e = Assert.Throws<LoraSharpException>(() => OptimizerFactory.Create("Lion", [new ParamGroup("g", [p], 1e-4)], ["weight_decay=0.1", "bogus=1"]));
        Assert.Contains("bogus", e.Message);
        Assert.Throws<LoraSharpException>(() => OptimizerFactory.Create("SGD", [new ParamGroup("g", [p], 1e-4)]));
    }

    [Fact]
    public void Min_snr_weights_follow_kohya_for_epsilon_and_v()
    {
        var n = new DiffusionNoise();
        var ac = n.AlphasCumprod;
        var t = tensor(new long[] { 0, 500, 999 });
        var eps = n.MinSnrWeights(t, 5, vPrediction: false).data<float>().ToArray();
        var v = n.MinSnrWeights(t, 5, vPrediction: true).data<float>().ToArray();
        for (int i = 0; i < 3; i++)
        {
            int ti = new[] { 0, 500, 999 }[i];
            double snr = ac[ti] / (1.0 - ac[ti]);
            Assert.Equal(Math.Min(snr, 5) / snr, eps[i], 5);
            Assert.Equal(Math.Min(snr, 5) / (snr + 1), v[i], 5);
        }
        Assert.True(eps[0] < 0.01); // t = 0: SNR ≈ 1175 → 5/1175
        Assert.Equal(1.0, eps[2], 5); // t = 999: SNR < 5 → weight 1
        Assert.Equal(0.2763, ac[500], 3); // SD's scaled_linear schedule
    }

    [Fact]
    public void Noise_offset_shifts_each_channel_by_one_constant()
    {
        using var g = new Generator(3);
        var noise = zeros(2, 4, 8, 8);
        var shifted = DiffusionNoise.ApplyNoiseOffset(noise, 0.1, g);
        // every (b, c) plane is constant, the constants ~ N(0, 0.1²)
        var std = shifted.std([2, 3]);
        Assert.True(std.max().item<float>() < 1e-7);
        var means = shifted.mean([2, 3]);
        Assert.True(means.abs().max().item<float>() > 0.001);
        Assert.True(means.abs().max().item<float>() < 0.5);
    }

    [Fact]
    public void Pyramid_noise_has_unit_std_and_low_frequency_content()
    {
        using var g = new Generator(5);
        var baseNoise = randn([4, 4, 32, 32], generator: g);
        var pyr = DiffusionNoise.PyramidNoise(baseNoise, 6, 0.8, new Random(1), g);
        Assert.Equal(1.0, pyr.std().item<float>(), 3);
        // upsampled coarse levels correlate neighbouring pixels; white noise does not
        static double NeighbourCorrelation(Tensor x)
        {
            var a = x[.., .., .., 1..].flatten();
            var b = x[.., .., .., ..^1].flatten();
            return ((a - a.mean()) * (b - b.mean())).mean().item<float>() / (a.std() * b.std()).item<float>();
        }
        double pc = NeighbourCorrelation(pyr), wc = NeighbourCorrelation(baseNoise);
        Assert.True(pc > 0.2 && Math.Abs(wc) < 0.05, $"pyramid {pc} vs white {wc}");
    }

    [Fact]
    public void Noisy_latents_and_v_targets_follow_the_ddpm_formulas()
    {
        var n = new DiffusionNoise();
        var x0 = ones(1, 1, 1, 1) * 2;
        var eps = ones(1, 1, 1, 1) * -1;
        var t = tensor(new long[] { 300 });
        double a = n.AlphasCumprod[300];
        Assert.Equal(Math.Sqrt(a) * 2 - Math.Sqrt(1 - a), n.AddNoise(x0, eps, t).item<float>(), 5);
        Assert.Equal(-Math.Sqrt(a) - Math.Sqrt(1 - a) * 2, n.VelocityTarget(x0, eps, t).item<float>(), 5);
    }
}
