using static TorchSharp.torch;

namespace LoraSharp.Diffusion;

/// <summary>
/// Euler (Karras et al. 2022, Algorithm 2 with no churn) on the discrete SD schedule: diffusers'
/// EulerDiscreteScheduler with linear sigma interpolation and a final σ of 0; with <c>ancestral: true</c>,
/// "Euler a" (EulerAncestralDiscreteScheduler), which steps to σ_down and adds fresh noise of std σ_up.
/// <list type="bullet">
/// <item>timesteps t_i by timestep_spacing (default linspace(0, N-1, steps) reversed, fractional), σ_i = interp(t_i, σ_train), σ_steps = 0</item>
/// <item>x_0 = noise · σ_0 (√(σ_0²+1) with leading spacing); UNet input = x / √(σ_i²+1)</item>
/// <item>x̂0 = x − σ·ε (epsilon) or ε·(−σ/√(σ²+1)) + x/(σ²+1) (v-prediction); d = (x − x̂0)/σ</item>
/// <item>Euler: x' = x + d·(σ_{i+1} − σ_i)</item>
/// <item>Euler a: σ_up = √(σ_{i+1}²(σ_i² − σ_{i+1}²)/σ_i²), σ_down = √(σ_{i+1}² − σ_up²); x' = x + d·(σ_down − σ_i) + noise·σ_up</item>
/// </list>
/// </summary>
public sealed class EulerSampler : ISampler
{
    readonly float[] _timesteps;
    readonly float[] _sigmas;

    public string Name => Ancestral ? "Euler a" : "Euler";
    public bool Ancestral { get; }
    public int Steps { get; }
    public ScheduleConfig Config { get; }
    public IReadOnlyList<float> Timesteps => _timesteps;
    public IReadOnlyList<float>? Sigmas => _sigmas;
    public double InitNoiseSigma { get; }

    public EulerSampler(int steps, ScheduleConfig? config = null, bool ancestral = false)
    {
        Config = config ?? ScheduleConfig.StableDiffusion;
        Ancestral = ancestral;
        int n = Config.NumTrainTimesteps;
        ScheduleMath.CheckSteps(steps, n);
        Steps = steps;
        var spacing = Config.Spacing ?? TimestepSpacing.Linspace;

        double[] t = spacing switch
        {
            TimestepSpacing.Linspace => ScheduleMath.Linspace(0, n - 1, steps).Reverse().Select(v => (double)(float)v).ToArray(),
            TimestepSpacing.Leading => Enumerable.Range(0, steps).Select(k => (double)(k * (n / steps) + Config.StepsOffset)).Reverse().ToArray(),
            TimestepSpacing.Trailing => ScheduleMath.TrailingRange(n, steps).Select(v => Math.Round(v, MidpointRounding.ToEven) - 1).ToArray(),
            _ => throw new ArgumentOutOfRangeException(nameof(config)),
        };
        _timesteps = t.Select(v => (float)v).ToArray();

        var trainSigmas = Config.TrainSigmas();
        _sigmas = new float[steps + 1];
        for (int i = 0; i < steps; i++)
            _sigmas[i] = (float)ScheduleMath.Interp(_timesteps[i], trainSigmas);
        _sigmas[steps] = 0f;

        double maxSigma = _sigmas.Max();
        InitNoiseSigma = spacing is TimestepSpacing.Linspace or TimestepSpacing.Trailing ? maxSigma : Math.Sqrt(maxSigma * maxSigma + 1);
    }

    /// <summary>Nothing to release: this sampler keeps no tensors between steps.</summary>
    public void Dispose() { }

    public Tensor InitialLatents(long[] shape, INoiseSource noise, ScalarType dtype, Device device)
    {
        using var scope = NewDisposeScope();
        return (noise.Next(shape, dtype, device) * InitNoiseSigma).MoveToOuterDisposeScope();
    }

    public Tensor ScaleModelInput(Tensor sample, int i)
    {
        ScheduleMath.CheckIndex(i, Steps);
        double sigma = _sigmas[i];
        using var scope = NewDisposeScope();
        return (sample / Math.Sqrt(sigma * sigma + 1)).MoveToOuterDisposeScope();
    }

    public Tensor Step(Tensor modelOutput, int i, Tensor sample, INoiseSource? noise = null)
    {
        ScheduleMath.CheckIndex(i, Steps);
        using var scope = NewDisposeScope();
        var x = sample.to_type(ScalarType.Float32);
        var eps = modelOutput.to_type(ScalarType.Float32);
        double sigma = _sigmas[i], sigmaNext = _sigmas[i + 1];

        var predX0 = Config.Prediction switch
        {
            PredictionType.Epsilon => x - sigma * eps,
            PredictionType.VPrediction => eps * (-sigma / Math.Sqrt(sigma * sigma + 1)) + x / (sigma * sigma + 1),
            _ => throw new InvalidOperationException(),
        };
        var derivative = (x - predX0) / sigma;

        Tensor prev;
        if (!Ancestral)
        {
            prev = x + derivative * (sigmaNext - sigma);
        }
        else
        {
            double sigmaUp = Math.Sqrt(sigmaNext * sigmaNext * (sigma * sigma - sigmaNext * sigmaNext) / (sigma * sigma));
            double sigmaDown = Math.Sqrt(sigmaNext * sigmaNext - sigmaUp * sigmaUp);
            prev = x + derivative * (sigmaDown - sigma);
            var z = noise is null
                ? randn(modelOutput.shape, dtype: modelOutput.dtype, device: modelOutput.device)
                : noise.Next(modelOutput.shape, modelOutput.dtype, modelOutput.device);
            prev = prev + z.to_type(ScalarType.Float32) * sigmaUp;
        }
        return prev.to_type(modelOutput.dtype).MoveToOuterDisposeScope();
    }
}
