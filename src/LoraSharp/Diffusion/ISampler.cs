using static TorchSharp.torch;

namespace LoraSharp.Diffusion;

/// <summary>
/// A diffusion sampler set up for a fixed number of steps. The pipeline loop is
/// <code>
/// var x = sampler.InitialLatents(shape, noise, dtype, device);
/// for (int i = 0; i &lt; sampler.Steps; i++) {
///     var eps = Guidance.Apply(unet(sampler.ScaleModelInput(x, i), sampler.Timesteps[i]) ...);
///     x = sampler.Step(eps, i, x, noise);
/// }
/// </code>
/// Steps must be taken in order 0..Steps-1 (multistep samplers keep the previous model outputs; step 0 resets them).
/// Returned tensors belong to the caller; state a sampler keeps between steps belongs to the sampler (dispose it).
/// </summary>
public interface ISampler : IDisposable
{
    /// <summary>A1111's display name ("Euler a", "DPM++ 2M Karras").</summary>
    string Name { get; }

    int Steps { get; }

    ScheduleConfig Config { get; }

    /// <summary>The UNet timestep of each step (fractional for Euler-type samplers with linspace spacing).</summary>
    IReadOnlyList<float> Timesteps { get; }

    /// <summary>σ of each step plus the final σ (Steps + 1 values), or null for samplers without sigmas (DDIM).</summary>
    IReadOnlyList<float>? Sigmas { get; }

    /// <summary>Standard deviation of the initial noise (σ_max for Euler-type linspace/trailing, √(σ_max²+1) for leading, 1 otherwise).</summary>
    double InitNoiseSigma { get; }

    /// <summary>Initial latents = noise · <see cref="InitNoiseSigma"/>.</summary>
    Tensor InitialLatents(long[] shape, INoiseSource noise, ScalarType dtype, Device device);

    /// <summary>The UNet input at step i (Euler-type: sample / √(σ²+1); others: the sample unchanged, as a new tensor).</summary>
    Tensor ScaleModelInput(Tensor sample, int i);

    /// <summary>One denoising step from the (guided) model output; stochastic samplers draw noise from <paramref name="noise"/> (global RNG when null).</summary>
    Tensor Step(Tensor modelOutput, int i, Tensor sample, INoiseSource? noise = null);
}

/// <summary>Classifier-free guidance.</summary>
public static class Guidance
{
    /// <summary>guided = uncond + scale · (cond − uncond).</summary>
    public static Tensor Apply(Tensor uncond, Tensor cond, double scale)
    {
        using var scope = NewDisposeScope();
        return (uncond + scale * (cond - uncond)).MoveToOuterDisposeScope();
    }

    /// <summary>Splits a UNet output of batch [uncond; cond] (2B) into halves and applies <see cref="Apply(Tensor, Tensor, double)"/>.</summary>
    public static Tensor ApplyBatched(Tensor uncondThenCond, double scale)
    {
        if (uncondThenCond.shape[0] % 2 != 0)
            throw new ArgumentException($"expected an even batch [uncond; cond], got {uncondThenCond.shape[0]}", nameof(uncondThenCond));
        using var scope = NewDisposeScope();
        var halves = uncondThenCond.chunk(2, 0);
        return Apply(halves[0], halves[1], scale).MoveToOuterDisposeScope();
    }
}

/// <summary>Schedule arithmetic shared by the samplers, written to match numpy/diffusers bit for bit where it matters.</summary>
internal static class ScheduleMath
{
    /// <summary>np.linspace(start, stop, num) in float64 (last value exactly stop).</summary>
    public static double[] Linspace(double start, double stop, int num)
    {
        var r = new double[num];
        if (num == 1) { r[0] = start; return r; }
        double step = (stop - start) / (num - 1);
        for (int i = 0; i < num; i++) r[i] = start + i * step;
        r[num - 1] = stop;
        return r;
    }

    /// <summary>np.interp(x, arange(len(fp)), fp).</summary>
    public static double Interp(double x, float[] fp)
    {
        if (x <= 0) return fp[0];
        if (x >= fp.Length - 1) return fp[^1];
        int j = (int)Math.Floor(x);
        double slope = ((double)fp[j + 1] - fp[j]) / 1.0;
        return slope * (x - j) + fp[j];
    }

    /// <summary>Karras et al. (2022) sigmas: (σmax^(1/ρ) + ramp·(σmin^(1/ρ) − σmax^(1/ρ)))^ρ, ρ = 7, ramp = linspace(0, 1, n).</summary>
    public static double[] KarrasSigmas(double sigmaMin, double sigmaMax, int n, double rho = 7.0)
    {
        var ramp = Linspace(0, 1, n);
        double minInv = Math.Pow(sigmaMin, 1 / rho), maxInv = Math.Pow(sigmaMax, 1 / rho);
        return ramp.Select(r => Math.Pow(maxInv + r * (minInv - maxInv), rho)).ToArray();
    }

    /// <summary>diffusers' _sigma_to_t: the fractional training timestep whose log σ interpolates to log σ.</summary>
    public static double SigmaToT(double sigma, float[] logSigmas)
    {
        double logSigma = Math.Log(Math.Max(sigma, 1e-10));
        int low = 0;
        for (int k = 0; k < logSigmas.Length; k++)
            if (logSigma - logSigmas[k] >= 0) low = k;
        low = Math.Min(low, logSigmas.Length - 2);
        int high = low + 1;
        double lo = logSigmas[low], hi = logSigmas[high];
        double w = Math.Clamp((lo - logSigma) / (lo - hi), 0, 1);
        return (1 - w) * low + w * high;
    }

    /// <summary>Integer timesteps for DDIM-style samplers (descending), per diffusers' timestep_spacing.</summary>
    public static long[] DiscreteTimesteps(TimestepSpacing spacing, int trainSteps, int steps, int stepsOffset)
    {
        return spacing switch
        {
            TimestepSpacing.Linspace => Linspace(0, trainSteps - 1, steps).Select(v => (long)Math.Round(v, MidpointRounding.ToEven)).Reverse().ToArray(),
            TimestepSpacing.Leading => Enumerable.Range(0, steps).Select(k => (long)k * (trainSteps / steps) + stepsOffset).Reverse().ToArray(),
            TimestepSpacing.Trailing => TrailingRange(trainSteps, steps).Select(v => (long)Math.Round(v, MidpointRounding.ToEven) - 1).ToArray(),
            _ => throw new ArgumentOutOfRangeException(nameof(spacing)),
        };
    }

    /// <summary>np.arange(trainSteps, 0, -trainSteps/steps).</summary>
    public static double[] TrailingRange(double start, int steps)
    {
        double ratio = start / steps;
        int count = (int)Math.Ceiling((0 - start) / -ratio);
        return Enumerable.Range(0, count).Select(k => start - k * ratio).ToArray();
    }

    public static void CheckSteps(int steps, int trainSteps)
    {
        if (steps < 1 || steps > trainSteps)
            throw new LoraSharpException($"steps must be between 1 and {trainSteps}, got {steps}", key: "steps");
    }

    public static void CheckIndex(int i, int steps)
    {
        if (i < 0 || i >= steps)
            throw new ArgumentOutOfRangeException(nameof(i), i, $"step index must be in 0..{steps - 1}");
    }
}
