using static TorchSharp.torch;

namespace LoraSharp.Diffusion;

/// <summary>
/// DPM-Solver++(2M) (Lu et al. 2022), diffusers' DPMSolverMultistepScheduler with algorithm_type "dpmsolver++",
/// solver_order 2, solver_type "midpoint", lower_order_final, final σ = 0; optionally Karras sigmas ("DPM++ 2M Karras").
/// <list type="bullet">
/// <item>timesteps: linspace(0, N−1, steps+1).round() reversed without the last (default); with Karras, σ_i =
/// Karras(σ_min, σ_max, steps) and t_i = round(σ→t(σ_i)); otherwise σ_i = interp(t_i, σ_train)</item>
/// <item>α_i = 1/√(σ_i²+1), s_i = σ_i·α_i, λ_i = log α_i − log s_i</item>
/// <item>model output → x̂0: (x − s·ε)/α (epsilon) or α·x − s·v (v-prediction)</item>
/// <item>first order (step 0 and the last step): x' = (s_{i+1}/s_i)·x − α_{i+1}(e^{−h} − 1)·x̂0_i, h = λ_{i+1} − λ_i</item>
/// <item>second order: r = h_prev/h, D1 = (x̂0_i − x̂0_{i−1})/r, x' = (s_{i+1}/s_i)·x − α_{i+1}(e^{−h} − 1)·(x̂0_i + D1/2)</item>
/// </list>
/// The UNet input is the sample unchanged; the initial noise has std 1. Steps must run in order (the previous x̂0 is kept).
/// </summary>
public sealed class DpmSolverMultistepSampler : ISampler
{
    readonly float[] _sigmas;
    readonly float[] _timesteps;
    Tensor? _previousX0;
    int _expectedNext;

    public string Name => Karras ? "DPM++ 2M Karras" : "DPM++ 2M";
    public bool Karras { get; }
    public int Steps { get; }
    public ScheduleConfig Config { get; }
    public IReadOnlyList<float> Timesteps => _timesteps;
    public IReadOnlyList<float>? Sigmas => _sigmas;
    public double InitNoiseSigma => 1.0;

    public DpmSolverMultistepSampler(int steps, ScheduleConfig? config = null, bool karras = false)
    {
        Config = config ?? ScheduleConfig.StableDiffusion;
        int n = Config.NumTrainTimesteps;
        ScheduleMath.CheckSteps(steps, n);
        Steps = steps;
        Karras = karras;

        var spacing = Config.Spacing ?? TimestepSpacing.Linspace;
        // lambda_min_clipped = -inf → the last usable training timestep is N.
        double[] t = spacing switch
        {
            TimestepSpacing.Linspace => ScheduleMath.Linspace(0, n - 1, steps + 1).Select(v => Math.Round(v, MidpointRounding.ToEven)).Reverse().Take(steps).ToArray(),
            TimestepSpacing.Leading => Enumerable.Range(0, steps + 1).Select(k => (double)(k * (n / (steps + 1)))).Reverse().Take(steps).Select(v => v + Config.StepsOffset).ToArray(),
            TimestepSpacing.Trailing => ScheduleMath.TrailingRange(n, steps).Select(v => Math.Round(v, MidpointRounding.ToEven) - 1).ToArray(),
            _ => throw new ArgumentOutOfRangeException(nameof(config)),
        };

        var trainSigmas = Config.TrainSigmas();
        double[] sigmas;
        if (karras)
        {
            var logSigmas = trainSigmas.Select(s => MathF.Log(s)).ToArray();
            sigmas = ScheduleMath.KarrasSigmas(trainSigmas[0], trainSigmas[^1], steps);
            t = sigmas.Select(s => Math.Round(ScheduleMath.SigmaToT(s, logSigmas), MidpointRounding.ToEven)).ToArray();
        }
        else
        {
            sigmas = t.Select(v => ScheduleMath.Interp(v, trainSigmas)).ToArray();
        }
        _timesteps = t.Select(v => (float)(long)v).ToArray();
        _sigmas = [.. sigmas.Select(s => (float)s), 0f];
    }

    public Tensor InitialLatents(long[] shape, INoiseSource noise, ScalarType dtype, Device device) => noise.Next(shape, dtype, device);

    /// <summary>Releases the kept model output.</summary>
    public void Dispose()
    {
        _previousX0?.Dispose();
        _previousX0 = null;
        _expectedNext = 0;
    }

    public Tensor ScaleModelInput(Tensor sample, int i)
    {
        ScheduleMath.CheckIndex(i, Steps);
        return sample.clone();
    }

    static (double Alpha, double SigmaT, double Lambda) AlphaSigma(double sigma)
    {
        double alpha = 1 / Math.Sqrt(sigma * sigma + 1);
        double s = sigma * alpha;
        return (alpha, s, Math.Log(alpha) - Math.Log(s));
    }

    public Tensor Step(Tensor modelOutput, int i, Tensor sample, INoiseSource? noise = null)
    {
        ScheduleMath.CheckIndex(i, Steps);
        if (i == 0)
        {
            _previousX0?.Dispose();
            _previousX0 = null;
            _expectedNext = 0;
        }
        if (i != _expectedNext)
            throw new InvalidOperationException($"{Name} is a multistep sampler: expected step {_expectedNext}, got {i} (start again at step 0)");

        using var scope = NewDisposeScope();
        var x = sample.to_type(ScalarType.Float32);
        var output = modelOutput.to_type(ScalarType.Float32);

        var (alphaS, sigmaS, lambdaS) = AlphaSigma(_sigmas[i]);
        var x0 = Config.Prediction == PredictionType.Epsilon
            ? (x - sigmaS * output) / alphaS
            : alphaS * x - sigmaS * output;

        var (alphaT, sigmaT, lambdaT) = AlphaSigma(_sigmas[i + 1]);
        double h = lambdaT - lambdaS;
        double expm = Math.Exp(-h) - 1.0;

        bool lastStep = i == Steps - 1; // final σ is 0: always first order (lower_order_final / final_sigmas_type zero)
        bool lowerOrderSecond = i == Steps - 2 && Steps < 15;
        Tensor prev;
        if (_previousX0 is null || lastStep)
        {
            prev = (sigmaT / sigmaS) * x - (alphaT * expm) * x0;
        }
        else
        {
            _ = lowerOrderSecond; // order 2 is the highest order here, so the "lower order second" case is order 2 as well
            var (_, _, lambdaPrev) = AlphaSigma(_sigmas[i - 1]);
            double r = (lambdaS - lambdaPrev) / h;
            var d1 = (1.0 / r) * (x0 - _previousX0);
            prev = (sigmaT / sigmaS) * x - (alphaT * expm) * x0 - 0.5 * (alphaT * expm) * d1;
        }

        _previousX0?.Dispose();
        _previousX0 = x0.detach().DetachFromDisposeScope(); // sampler state: owned here, not by the caller's scope
        _expectedNext = i + 1;
        return prev.to_type(modelOutput.dtype).MoveToOuterDisposeScope();
    }
}
