using LoraSharp.Diffusion;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Training.Diffusion;

/// <summary>
/// The DDPM training maths kohya uses: scaled_linear schedule (1000 steps), uniform timesteps, noisy latents
/// x_t = √ᾱ·x0 + √(1−ᾱ)·ε, v target √ᾱ·ε − √(1−ᾱ)·x0, noise offset, multi-resolution (pyramid) noise and min-SNR
/// loss weights. All functions take and return tensors on the caller's device.
/// </summary>
public sealed class DiffusionNoise
{
    readonly float[] _alphasCumprod;

    public DiffusionNoise(ScheduleConfig? schedule = null)
    {
        Schedule = schedule ?? ScheduleConfig.StableDiffusion;
        _alphasCumprod = Schedule.AlphasCumprod();
    }

    public ScheduleConfig Schedule { get; }
    public int NumTrainTimesteps => _alphasCumprod.Length;
    public IReadOnlyList<float> AlphasCumprod => _alphasCumprod;

    /// <summary>SNR_t = ᾱ/(1−ᾱ).</summary>
    public double Snr(int t) => _alphasCumprod[t] / (1.0 - _alphasCumprod[t]);

    Tensor Gather(Tensor timesteps, Func<float, double> f, Device device)
    {
        var ts = timesteps.to(DeviceType.CPU).data<long>().ToArray();
        var values = ts.Select(t => (float)f(_alphasCumprod[t])).ToArray();
        return tensor(values, device: device).reshape(ts.Length, 1, 1, 1);
    }

    /// <summary>Uniform integer timesteps in [min, max) (kohya), drawn from <paramref name="generator"/>.</summary>
    public static Tensor SampleTimesteps(long batch, int min, int max, Device device, Generator? generator = null) =>
        randint(min, max, [batch], dtype: ScalarType.Int64, generator: generator).to(device);

    /// <summary>x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε (per-sample t, in float32).</summary>
    public Tensor AddNoise(Tensor latents, Tensor noise, Tensor timesteps)
    {
        using var scope = NewDisposeScope();
        var a = Gather(timesteps, ac => Math.Sqrt(ac), latents.device);
        var s = Gather(timesteps, ac => Math.Sqrt(1 - ac), latents.device);
        return (a * latents.to_type(ScalarType.Float32) + s * noise.to_type(ScalarType.Float32)).MoveToOuterDisposeScope();
    }

    /// <summary>v = √ᾱ·ε − √(1−ᾱ)·x0 (the v-prediction target).</summary>
    public Tensor VelocityTarget(Tensor latents, Tensor noise, Tensor timesteps)
    {
        using var scope = NewDisposeScope();
        var a = Gather(timesteps, ac => Math.Sqrt(ac), latents.device);
        var s = Gather(timesteps, ac => Math.Sqrt(1 - ac), latents.device);
        return (a * noise.to_type(ScalarType.Float32) - s * latents.to_type(ScalarType.Float32)).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// min-SNR-γ weights [B]: min(SNR_t, γ)/SNR_t for ε-prediction, min(SNR_t, γ)/(SNR_t + 1) for v-prediction (kohya
    /// apply_snr_weight).
    /// </summary>
    public Tensor MinSnrWeights(Tensor timesteps, double gamma, bool vPrediction)
    {
        var ts = timesteps.to(DeviceType.CPU).data<long>().ToArray();
        var w = ts.Select(t =>
        {
            double snr = Snr((int)t);
            return (float)(Math.Min(snr, gamma) / (vPrediction ? snr + 1 : snr));
        }).ToArray();
        return tensor(w, device: timesteps.device);
    }

    /// <summary>kohya noise offset: ε + c·N(0, 1) drawn per (batch, channel) and broadcast over H, W.</summary>
    public static Tensor ApplyNoiseOffset(Tensor noise, double offset, Generator? generator = null)
    {
        using var scope = NewDisposeScope();
        var extra = randn([noise.shape[0], noise.shape[1], 1, 1], dtype: noise.dtype, generator: generator).to(noise.device);
        return (noise + offset * extra).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// kohya pyramid_noise_like: for i = 0..iterations−1, r = 2 + 2·U(0,1), add bilinear-upsampled N(0,1) noise of size
    /// max(1, ⌊H/rⁱ⌋) × max(1, ⌊W/rⁱ⌋) scaled by discountⁱ (stop after a 1-pixel level), then divide by the std.
    /// </summary>
    public static Tensor PyramidNoise(Tensor noise, int iterations, double discount, Random rng, Generator? generator = null)
    {
        using var scope = NewDisposeScope();
        long b = noise.shape[0], c = noise.shape[1], h = noise.shape[2], w = noise.shape[3];
        var result = noise.to_type(ScalarType.Float32).clone();
        for (int i = 0; i < iterations; i++)
        {
            double r = rng.NextDouble() * 2 + 2;
            long hn = Math.Max(1, (long)(h / Math.Pow(r, i))), wn = Math.Max(1, (long)(w / Math.Pow(r, i)));
            var low = randn([b, c, hn, wn], generator: generator).to(noise.device);
            var up = nn.functional.interpolate(low, [h, w], mode: InterpolationMode.Bilinear, align_corners: false);
            result = result + up * Math.Pow(discount, i);
            if (hn == 1 || wn == 1) break;
        }
        return (result / result.std()).to_type(noise.dtype).MoveToOuterDisposeScope();
    }
}
