using static TorchSharp.torch;

namespace LoraSharp.Diffusion;

/// <summary>
/// DDIM (Song et al. 2020) as diffusers' DDIMScheduler with set_alpha_to_one = false, clip_sample = false,
/// no thresholding. Timesteps default to "leading" spacing: k·(N/steps) + steps_offset.
/// <list type="bullet">
/// <item>t' = t − N/steps; ᾱ' = ᾱ_{t'} (ᾱ_0 when t' &lt; 0)</item>
/// <item>epsilon: x̂0 = (x − √(1−ᾱ)·ε)/√ᾱ; v: x̂0 = √ᾱ·x − √(1−ᾱ)·v, ε = √ᾱ·v + √(1−ᾱ)·x</item>
/// <item>σ = η·√((1−ᾱ')/(1−ᾱ)·(1 − ᾱ/ᾱ')); x' = √ᾱ'·x̂0 + √(1−ᾱ'−σ²)·ε (+ σ·noise when η &gt; 0)</item>
/// </list>
/// The UNet input is the sample unchanged; the initial noise has std 1.
/// </summary>
public sealed class DdimSampler : ISampler
{
    readonly float[] _alphasCumprod;
    readonly long[] _timesteps;
    readonly float[] _timestepsF;

    public string Name => "DDIM";
    public int Steps { get; }
    public ScheduleConfig Config { get; }
    public IReadOnlyList<float> Timesteps => _timestepsF;
    public IReadOnlyList<float>? Sigmas => null;
    public double InitNoiseSigma => 1.0;

    /// <summary>η: 0 = deterministic DDIM, 1 = DDPM-like ancestral noise.</summary>
    public double Eta { get; }

    public DdimSampler(int steps, ScheduleConfig? config = null, double eta = 0.0)
    {
        Config = config ?? ScheduleConfig.StableDiffusion;
        ScheduleMath.CheckSteps(steps, Config.NumTrainTimesteps);
        Steps = steps;
        Eta = eta;
        _alphasCumprod = Config.AlphasCumprod();
        _timesteps = ScheduleMath.DiscreteTimesteps(Config.Spacing ?? TimestepSpacing.Leading, Config.NumTrainTimesteps, steps, Config.StepsOffset);
        _timestepsF = _timesteps.Select(t => (float)t).ToArray();
    }

    /// <summary>Nothing to release: this sampler keeps no tensors between steps.</summary>
    public void Dispose() { }

    public Tensor InitialLatents(long[] shape, INoiseSource noise, ScalarType dtype, Device device) => noise.Next(shape, dtype, device);

    public Tensor ScaleModelInput(Tensor sample, int i)
    {
        ScheduleMath.CheckIndex(i, Steps);
        return sample.clone();
    }

    public Tensor Step(Tensor modelOutput, int i, Tensor sample, INoiseSource? noise = null)
    {
        ScheduleMath.CheckIndex(i, Steps);
        using var scope = NewDisposeScope();
        long t = _timesteps[i];
        long prevT = t - Config.NumTrainTimesteps / Steps;
        double alphaProd = _alphasCumprod[t];
        double alphaProdPrev = prevT >= 0 ? _alphasCumprod[prevT] : _alphasCumprod[0];
        double betaProd = 1 - alphaProd;

        var x = sample.to_type(ScalarType.Float32);
        var output = modelOutput.to_type(ScalarType.Float32);
        Tensor predX0, predEps;
        if (Config.Prediction == PredictionType.Epsilon)
        {
            predX0 = (x - Math.Sqrt(betaProd) * output) / Math.Sqrt(alphaProd);
            predEps = output;
        }
        else
        {
            predX0 = Math.Sqrt(alphaProd) * x - Math.Sqrt(betaProd) * output;
            predEps = Math.Sqrt(alphaProd) * output + Math.Sqrt(betaProd) * x;
        }

        double variance = (1 - alphaProdPrev) / betaProd * (1 - alphaProd / alphaProdPrev);
        double std = Eta * Math.Sqrt(variance);
        var direction = Math.Sqrt(1 - alphaProdPrev - std * std) * predEps;
        var prev = Math.Sqrt(alphaProdPrev) * predX0 + direction;
        if (Eta > 0)
        {
            var z = noise is null
                ? randn(modelOutput.shape, dtype: modelOutput.dtype, device: modelOutput.device)
                : noise.Next(modelOutput.shape, modelOutput.dtype, modelOutput.device);
            prev = prev + std * z.to_type(ScalarType.Float32);
        }
        return prev.to_type(modelOutput.dtype).MoveToOuterDisposeScope();
    }
}
