using LoraSharp.Diffusion;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Training.Diffusion;

/// <summary>
/// The DDPM training maths kohya uses: scaled_linear schedule (1000 steps), uniform timesteps, noisy latents
/// x_t = √ᾱ·x0 + √(1−ᾱ)·ε, v target √ᾱ·ε − √(1−ᾱ)·x0, noise offset, multi-resolution (pyramid) noise, min-SNR
/// loss weights, zero terminal SNR and the L1 / Huber / smooth-L1 losses with their threshold schedules. All functions take and return tensors on the caller's device.
/// </summary>
public sealed class DiffusionNoise
{
    readonly float[] _alphasCumprod;

    /// <param name="zeroTerminalSnr">
    /// Rescale the schedule to zero terminal SNR (Lin et al. 2023, what kohya's <c>zero_terminal_snr</c> does to the
    /// training scheduler): √ᾱ is shifted so the last step is 0 and scaled so the first keeps its value.
    /// </param>
    public DiffusionNoise(ScheduleConfig? schedule = null, bool zeroTerminalSnr = false)
    {
        Schedule = schedule ?? ScheduleConfig.StableDiffusion;
        _alphasCumprod = Schedule.AlphasCumprod();
        if (zeroTerminalSnr) _alphasCumprod = ZeroTerminalSnr(_alphasCumprod);
    }

    /// <summary>ᾱ rescaled so that √ᾱ_T = 0 and √ᾱ_0 is unchanged: √ᾱ' = (√ᾱ − √ᾱ_T)·√ᾱ_0/(√ᾱ_0 − √ᾱ_T).</summary>
    public static float[] ZeroTerminalSnr(IReadOnlyList<float> alphasCumprod)
    {
        var root = alphasCumprod.Select(a => Math.Sqrt(a)).ToArray();
        double first = root[0], last = root[^1];
        return root.Select(r => (float)Math.Pow((r - last) * first / (first - last), 2)).ToArray();
    }

    public ScheduleConfig Schedule { get; }
    public int NumTrainTimesteps => _alphasCumprod.Length;
    public IReadOnlyList<float> AlphasCumprod => _alphasCumprod;

    /// <summary>SNR_t = ᾱ/(1−ᾱ).</summary>
    public double Snr(int t) => _alphasCumprod[t] / (1.0 - _alphasCumprod[t]);

    /// <summary>One float32 value per sample [B] on <paramref name="device"/>: <paramref name="f"/> of each timestep (read on the host).</summary>
    static Tensor PerSample(Tensor timesteps, Func<int, double> f, Device device)
    {
        long[] ts;
        using (var host = timesteps.to(DeviceType.CPU)) ts = host.data<long>().ToArray();
        return tensor(ts.Select(t => (float)f((int)t)).ToArray(), device: device);
    }

    Tensor Gather(Tensor timesteps, Func<float, double> f, Device device) =>
        PerSample(timesteps, t => f(_alphasCumprod[t]), device).reshape(-1, 1, 1, 1);

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
        return PerSample(timesteps, t =>
        {
            double snr = Snr(t);
            // SNR 0 (the last step of a zero-terminal-SNR schedule): ε-prediction takes the limit min(s, γ)/s → 1
            if (snr == 0) return vPrediction ? 0 : 1;
            return Math.Min(snr, gamma) / (vPrediction ? snr + 1 : snr);
        }, timesteps.device);
    }

    /// <summary>
    /// kohya's Huber threshold c_t per sample [B] (get_huber_threshold): <c>snr</c>: (1 − c)/(1 + σ_t)² + c with
    /// σ_t = √((1 − ᾱ_t)/ᾱ_t); <c>exponential</c>: scale·exp(ln(c)·t/T); <c>constant</c>: c·scale.
    /// </summary>
    public Tensor HuberThreshold(Tensor timesteps, string schedule, double c, double scale)
    {
        return PerSample(timesteps, t => schedule switch
        {
            "snr" => (1 - c) / Math.Pow(1 + Math.Sqrt((1 - _alphasCumprod[t]) / (double)_alphasCumprod[t]), 2) + c,
            "exponential" => Math.Exp(Math.Log(c) / NumTrainTimesteps * t) * scale,
            "constant" => c * scale,
            _ => throw new ArgumentException($"unknown Huber schedule '{schedule}' (expected snr, exponential or constant)", nameof(schedule)),
        }, timesteps.device);
    }

    /// <summary>
    /// kohya's conditional_loss per element (no reduction): <c>l2</c> (p − y)², <c>l1</c> |p − y|, <c>huber</c>
    /// 2c(√((p − y)² + c²) − c), <c>smooth_l1</c> 2(√((p − y)² + c²) − c), with c [B] broadcast per sample.
    /// </summary>
    public static Tensor Loss(Tensor prediction, Tensor target, string lossType, Tensor? huberC = null)
    {
        using var scope = NewDisposeScope();
        var d = prediction - target;
        Tensor C() => (huberC ?? throw new ArgumentException($"loss_type {lossType} needs a Huber threshold", nameof(huberC)))
            .reshape([-1, .. Enumerable.Repeat(1L, (int)prediction.dim() - 1)]);
        var loss = lossType switch
        {
            "l2" => d.pow(2),
            "l1" => d.abs(),
            "huber" => 2 * C() * ((d.pow(2) + C().pow(2)).sqrt() - C()),
            "smooth_l1" => 2 * ((d.pow(2) + C().pow(2)).sqrt() - C()),
            _ => throw new ArgumentException($"unknown loss_type '{lossType}' (expected l2, l1, huber or smooth_l1)", nameof(lossType)),
        };
        return loss.MoveToOuterDisposeScope();
    }

    /// <summary>kohya noise offset: ε + c·N(0, 1) drawn per (batch, channel) and broadcast over H, W.</summary>
    public static Tensor ApplyNoiseOffset(Tensor noise, double offset, Generator? generator = null)
    {
        using var scope = NewDisposeScope();
        var extra = randn([noise.shape[0], noise.shape[1], 1, 1], dtype: noise.dtype, generator: generator).to(noise.device);
        return (noise + offset * extra).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// kohya apply_noise_offset with adaptive_noise_scale s: the offset per (sample, channel) is max(0, c + s·|mean of
    /// the latent over H, W|), times N(0, 1) broadcast over H, W.
    /// </summary>
    public static Tensor ApplyAdaptiveNoiseOffset(Tensor noise, Tensor latents, double offset, double adaptiveScale, Generator? generator = null)
    {
        using var scope = NewDisposeScope();
        var perChannel = (offset + adaptiveScale * latents.to_type(ScalarType.Float32).mean([2, 3], keepdim: true).abs()).clamp_min(0);
        var extra = randn([noise.shape[0], noise.shape[1], 1, 1], dtype: ScalarType.Float32, generator: generator).to(noise.device);
        return (noise + (perChannel * extra).to_type(noise.dtype)).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// kohya's SNR loss terms after min-SNR, in its order, with SNR capped at 1000: scale_v_pred_loss_like_noise_pred
    /// (× SNR/(SNR+1)), v_pred_like_loss v (+ v·loss·(SNR+1)/SNR), debiased_estimation_loss (× 1/√SNR).
    /// </summary>
    public Tensor SnrLossTerms(Tensor perSample, Tensor timesteps, bool scaleVPredLikeNoisePred, double? vPredLikeLoss, bool debiased)
    {
        if (!scaleVPredLikeNoisePred && vPredLikeLoss is null && !debiased) return perSample;
        using var scope = NewDisposeScope();
        var snr = PerSample(timesteps, t => Math.Min(Snr(t), 1000), perSample.device);
        var scale = snr / (snr + 1);
        var loss = perSample;
        if (scaleVPredLikeNoisePred) loss = loss * scale;
        if (vPredLikeLoss is { } v) loss = loss + loss / scale * v;
        if (debiased) loss = loss / snr.sqrt();
        return loss.MoveToOuterDisposeScope();
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
