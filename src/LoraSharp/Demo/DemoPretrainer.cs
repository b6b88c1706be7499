using System.Diagnostics;
using System.Globalization;
using LoraSharp.Models.StableDiffusion;
using LoraSharp.Text;
using LoraSharp.Training.Diffusion;
using LoraSharp.Training.Optim;
using TorchSharp;
using static TorchSharp.torch;
using Parameter = TorchSharp.Modules.Parameter;

namespace LoraSharp.Demo;

/// <summary>Settings of <see cref="DemoPretrainer"/>. The defaults are what <c>lorasharp demo pretrain-image</c> runs.</summary>
public sealed record DemoPretrainOptions
{
    public int Seed { get; init; } = 1;
    /// <summary>Procedural images drawn for pretraining (circles, squares, triangles; never stars).</summary>
    public int Images { get; init; } = 3000;
    public int VaeSteps { get; init; } = 2500;
    public int VaeBatch { get; init; } = 16;
    /// <summary>The VAE trains on random square crops of this side (it is convolutional; 32 px crops cost a quarter of full images).</summary>
    public int VaeCrop { get; init; } = 32;
    public double VaeLearningRate { get; init; } = 2e-3;
    public double KlWeight { get; init; } = 1e-6;
    public int UnetSteps { get; init; } = 8000;
    public int UnetBatch { get; init; } = 48;
    public double UnetLearningRate { get; init; } = 1e-3;
    public double TextEncoderLearningRate { get; init; } = 3e-4;
    /// <summary>Captions replaced by the empty prompt (so classifier-free guidance works).</summary>
    public double CaptionDropout { get; init; } = 0.1;
    public ScalarType SaveDType { get; init; } = ScalarType.Float16;
    public Device? Device { get; init; }
}

/// <summary>One progress report: stage "vae", "latents" or "unet", step of total, current and smoothed loss.</summary>
public sealed record DemoPretrainProgress(string Stage, int Step, int Total, double Loss, double AverageLoss, TimeSpan Elapsed);

/// <summary>What a pretraining run produced.</summary>
public sealed record DemoPretrainResult(string ModelPath, string TokenizerFolder, string LossCurvePath, string VaeLossCurvePath,
    double VaeFinalLoss, double UnetFinalLoss, TimeSpan VaeTime, TimeSpan UnetTime, TimeSpan TotalTime, IReadOnlyList<double> LatentStd, string Description);

/// <summary>
/// Pretrains the demo image model from scratch on <see cref="ShapeScenes"/> (the star is held out), full-parameter:
/// <list type="number">
/// <item>VAE: L1 + MSE reconstruction with a small KL term, random crops, AdamW (Training/Optim) with a cosine schedule;</item>
/// <item>latent standardisation: each latent channel is re-parameterised (quant_conv / post_quant_conv rescaled, decode
/// unchanged) so that latents × 0.18215 have zero mean and unit variance — what the SD noise schedule assumes;</item>
/// <item>UNet + text encoder: DDPM ε-prediction loss with SD's schedule (<see cref="DiffusionNoise"/>), uniform
/// timesteps, 10 % empty captions, AdamW, cosine schedule, gradient clipping 1.0.</item>
/// </list>
/// Saves a single-file SD1 checkpoint (<see cref="StableDiffusionCheckpoint.Save"/>) with the tokenizer in
/// <c>tokenizer/</c> next to it and loss-curve PNGs. Deterministic for a seed on a given machine and thread count.
/// </summary>
public sealed class DemoPretrainer(DemoPretrainOptions options, Action<string>? log = null)
{
    readonly Action<string> _log = log ?? (_ => { });
    public event Action<DemoPretrainProgress>? Progress;

    public DemoPretrainResult Run(string outPath, CancellationToken cancel = default)
    {
        var o = options;
        var device = o.Device ?? CPU;
        var total = Stopwatch.StartNew();
        outPath = Path.GetFullPath(outPath);
        var dir = Path.GetDirectoryName(outPath)!;
        Directory.CreateDirectory(dir);
        var tokFolder = Path.Combine(dir, "tokenizer");
        int vocab = DemoTokenizer.Write(tokFolder, ShapeScenes.Words());
        var tokenizer = ClipTokenizer.FromFolder(tokFolder);

        manual_seed(o.Seed);
        var config = DemoModel.Config(vocab);
        using var model = new StableDiffusionModel(config, device);
        var description = DemoModel.Describe(model);
        _log(description);

        _log($"drawing {o.Images} {DemoModel.ImageSize}x{DemoModel.ImageSize} scenes (seed {o.Seed}; shapes: {string.Join(", ", ShapeScenes.PretrainingShapes.Select(ShapeScenes.ShapeName))})");
        var (pixels, scenes) = ShapeScenes.Batch(o.Images, DemoModel.ImageSize, o.Seed, ShapeScenes.PretrainingShapes);
        using var _pixels = pixels;
        var vae = model.Vae!;
        using var generator = new Generator((ulong)o.Seed + 17);
        var rng = new Random(o.Seed + 23);

        // ---- 1. VAE
        var vaeSw = Stopwatch.StartNew();
        var vaeLosses = TrainVae(vae, pixels, rng, generator, device, cancel);
        vaeSw.Stop();

        // ---- 2. latent statistics, standardisation
        var std = Standardize(vae, pixels, device);
        _log($"latent std per channel before standardisation: {string.Join(", ", std.Select(s => s.ToString("0.000", CultureInfo.InvariantCulture)))}");
        // the decoder is the ceiling of what any UNet (or LoRA) can draw: say how the held-out shape survives a round trip
        foreach (var shape in Enum.GetValues<DemoShape>())
        {
            var (rate, recon) = DemoChecks.VaeRoundTrip(model, shape, 50, 99);
            recon.Dispose();
            _log($"VAE round trip of 50 drawn {ShapeScenes.ShapeName(shape)}s: {rate:P0} read as stars");
        }

        // ---- 3. latents of every image (mean and std of the posterior, scaled)
        var (means, stds) = EncodeAll(vae, pixels, device);
        using var _m = means;
        using var _s = stds;

        // ---- 4. UNet + text encoder
        var ids = tensor(scenes.SelectMany(s => tokenizer.Encode(s.Caption()).Select(i => (long)i)).ToArray(), dtype: ScalarType.Int64).reshape(scenes.Count, tokenizer.MaxLength);
        using var _ids = ids;
        using var emptyIds = tensor(tokenizer.Encode("").Select(i => (long)i).ToArray(), dtype: ScalarType.Int64).reshape(1, tokenizer.MaxLength);
        var unetSw = Stopwatch.StartNew();
        var unetLosses = TrainUnet(model, means, stds, ids, emptyIds, rng, generator, device, cancel);
        unetSw.Stop();

        // ---- save
        double vaeFinal = Tail(vaeLosses), unetFinal = Tail(unetLosses);
        var meta = new Dictionary<string, string>
        {
            ["lorasharp_demo"] = "LoraSharp demo image model (SD 1.x architecture, tiny); pretrained on procedural shapes; the star is held out",
            ["lorasharp_demo_command"] = $"lorasharp demo pretrain-image --seed {o.Seed} --out {Path.GetFileName(outPath)}",
            ["lorasharp_demo_options"] = System.Text.Json.JsonSerializer.Serialize(o with { Device = null }),
            ["lorasharp_demo_vae_final_loss"] = vaeFinal.ToString("0.00000", CultureInfo.InvariantCulture),
            ["lorasharp_demo_unet_final_loss"] = unetFinal.ToString("0.00000", CultureInfo.InvariantCulture),
            ["lorasharp_demo_seconds"] = (total.Elapsed.TotalSeconds).ToString("0", CultureInfo.InvariantCulture),
        };
        StableDiffusionCheckpoint.Save(model, outPath, meta, o.SaveDType);
        var curve = Path.ChangeExtension(outPath, null) + "_loss.png";
        var vaeCurve = Path.ChangeExtension(outPath, null) + "_vae_loss.png";
        LossCurve.Save(curve, unetLosses, $"demo UNet + text encoder: DDPM ε loss, {o.UnetSteps} steps × {o.UnetBatch}");
        LossCurve.Save(vaeCurve, vaeLosses, $"demo VAE: L1 + MSE + {o.KlWeight:G2}·KL, {o.VaeSteps} steps × {o.VaeBatch} crops of {o.VaeCrop}");
        _log($"saved {outPath} ({new FileInfo(outPath).Length / 1e6:0.00} MB), tokenizer {tokFolder}, loss curves {curve}, {vaeCurve}");
        return new DemoPretrainResult(outPath, tokFolder, curve, vaeCurve, vaeFinal, unetFinal, vaeSw.Elapsed, unetSw.Elapsed, total.Elapsed, std, description);
    }

    /// <summary>Mean of the last 10 % of the losses (at least one).</summary>
    static double Tail(IReadOnlyList<double> losses) => losses.Count == 0 ? double.NaN : losses.Skip(losses.Count - Math.Max(1, losses.Count / 10)).Average();

    static double Cosine(long step, long total, long warmup) => new Training.Optim.LrSchedule(Training.Optim.LrScheduleKind.Cosine, warmup, total).Factor(step);

    List<double> TrainVae(AutoencoderKL vae, Tensor pixels, Random rng, Generator generator, Device device, CancellationToken cancel)
    {
        var o = options;
        var losses = new List<double>();
        var parameters = vae.parameters().ToList();
        using var opt = new AdamWOptimizer([new ParamGroup("vae", parameters, o.VaeLearningRate)], (0.9, 0.99), 1e-8, weightDecay: 0);
        vae.train();
        long n = pixels.shape[0], size = pixels.shape[2];
        int crop = Math.Min(o.VaeCrop, (int)size);
        var sw = Stopwatch.StartNew();
        double ema = double.NaN;
        long warmup = Math.Max(1, o.VaeSteps / 20);
        for (int step = 0; step < o.VaeSteps; step++)
        {
            cancel.ThrowIfCancellationRequested();
            double lossValue;
            using (var scope = NewDisposeScope())
            {
                var idx = Enumerable.Range(0, o.VaeBatch).Select(_ => (long)rng.Next((int)n)).ToArray();
                var crops = idx.Select(i =>
                {
                    int y = rng.Next((int)size - crop + 1) / 8 * 8, x = rng.Next((int)size - crop + 1) / 8 * 8;
                    return pixels[i].narrow(1, y, crop).narrow(2, x, crop);
                }).ToArray();
                var x0 = ShapeScenes.ToUnit(stack(crops)).to(device);
                using var dist = vae.Encode(x0);
                var z = dist.Sample(generator);
                var recon = vae.Decode(z);
                var kl = 0.5 * (dist.Mean.pow(2) + dist.Std.pow(2) - 1 - dist.LogVar).sum([1, 2, 3]).mean();
                var rec = (recon - x0).abs().mean() + (recon - x0).pow(2).mean();
                var loss = rec + o.KlWeight * kl;
                loss.backward();
                lossValue = rec.item<float>();
            }
            nn.utils.clip_grad_norm_(parameters.Where(p => p.grad is not null), 1.0);
            opt.Groups[0].LearningRate = o.VaeLearningRate * Cosine(step, o.VaeSteps, warmup);
            opt.Step();
            opt.ZeroGrad();
            losses.Add(lossValue);
            ema = double.IsNaN(ema) ? lossValue : 0.95 * ema + 0.05 * lossValue;
            if (step % 8 == 7) { GC.Collect(); GC.WaitForPendingFinalizers(); }
            Progress?.Invoke(new DemoPretrainProgress("vae", step + 1, o.VaeSteps, lossValue, ema, sw.Elapsed));
            if ((step + 1) % Math.Max(1, o.VaeSteps / 10) == 0) _log($"vae step {step + 1}/{o.VaeSteps}: loss {ema:0.0000}, {sw.Elapsed.TotalSeconds / (step + 1):0.00} s/step");
        }
        vae.eval();
        return losses;
    }

    /// <summary>
    /// Re-parameterises the VAE so that latents (posterior means) × scaling factor have per-channel mean 0 and std 1:
    /// z' = k (z − m) with k = 1 / (scale · std). quant_conv's mean rows become k·W, k·(b − m), its log-variance bias
    /// gains 2 ln k; post_quant_conv's columns are divided by k and its bias gains W·m, so Decode(z') = Decode(z).
    /// Returns the std of each channel before the change.
    /// </summary>
    internal static double[] Standardize(AutoencoderKL vae, Tensor pixels, Device device)
    {
        using var noGrad = no_grad();
        using var scope = NewDisposeScope();
        int count = (int)Math.Min(512, pixels.shape[0]);
        var mus = new List<Tensor>();
        for (int i = 0; i < count; i += 64)
        {
            using var dist = vae.Encode(ShapeScenes.ToUnit(pixels.narrow(0, i, Math.Min(64, count - i))).to(device));
            mus.Add(dist.Mean.detach().clone());
        }
        var all = cat(mus, 0);                       // [N, C, h, w]
        var m = all.mean([0, 2, 3]);                 // [C]
        var sd = all.std([0, 2, 3]);                 // [C]
        var k = 1.0 / (vae.Config.ScalingFactor * sd);
        int c = vae.Config.LatentChannels;
        var p = vae.named_parameters().ToDictionary(x => x.name, x => x.parameter);
        var qw = p["quant_conv.weight"]; var qb = p["quant_conv.bias"];
        var pw = p["post_quant_conv.weight"]; var pb = p["post_quant_conv.bias"];
        var pwOld = pw.detach().clone();
        qw.narrow(0, 0, c).mul_(k.reshape(c, 1, 1, 1));
        qb.narrow(0, 0, c).sub_(m).mul_(k);
        qb.narrow(0, c, c).add_((k * k).log());
        pw.div_(k.reshape(1, c, 1, 1));
        pb.add_(pwOld.reshape(c, c).matmul(m));
        return sd.to(DeviceType.CPU).data<float>().Select(f => (double)f).ToArray();
    }

    /// <summary>Posterior mean and std of every image, × scaling factor, as float32 on the device.</summary>
    static (Tensor Means, Tensor Stds) EncodeAll(AutoencoderKL vae, Tensor pixels, Device device)
    {
        using var noGrad = no_grad();
        using var scope = NewDisposeScope();
        var means = new List<Tensor>();
        var stds = new List<Tensor>();
        long n = pixels.shape[0];
        for (long i = 0; i < n; i += 64)
        {
            using var dist = vae.Encode(ShapeScenes.ToUnit(pixels.narrow(0, i, Math.Min(64, n - i))).to(device));
            means.Add(dist.Mean * vae.Config.ScalingFactor);
            stds.Add(dist.Std * vae.Config.ScalingFactor);
        }
        return (cat(means, 0).MoveToOuterDisposeScope(), cat(stds, 0).MoveToOuterDisposeScope());
    }

    List<double> TrainUnet(StableDiffusionModel model, Tensor means, Tensor stds, Tensor ids, Tensor emptyIds, Random rng, Generator generator, Device device, CancellationToken cancel)
    {
        var o = options;
        var te = model.TextEncoder!;
        var unet = model.Unet;
        var unetParams = unet.parameters().ToList();
        var teParams = te.parameters().ToList();
        using var opt = new AdamWOptimizer([new ParamGroup("unet", unetParams, o.UnetLearningRate), new ParamGroup("text_encoder", teParams, o.TextEncoderLearningRate)],
            (0.9, 0.99), 1e-8, weightDecay: 0);
        var noise = new DiffusionNoise();
        unet.train();
        te.train();
        long n = means.shape[0];
        var losses = new List<double>();
        var sw = Stopwatch.StartNew();
        double ema = double.NaN;
        long warmup = Math.Max(1, o.UnetSteps / 20);
        List<Parameter> all = [.. unetParams, .. teParams];
        for (int step = 0; step < o.UnetSteps; step++)
        {
            cancel.ThrowIfCancellationRequested();
            double lossValue;
            using (var scope = NewDisposeScope())
            {
                var idx = tensor(Enumerable.Range(0, o.UnetBatch).Select(_ => (long)rng.Next((int)n)).ToArray(), dtype: ScalarType.Int64);
                var drop = Enumerable.Range(0, o.UnetBatch).Select(_ => rng.NextDouble() < o.CaptionDropout).ToArray();
                var batchIds = ids.index_select(0, idx);
                var dropMask = tensor(drop, dtype: ScalarType.Bool).reshape(-1, 1);
                batchIds = where(dropMask, emptyIds.expand_as(batchIds), batchIds).to(device);
                var x0 = means.index_select(0, idx.to(device)) + stds.index_select(0, idx.to(device)) * randn(means.index_select(0, idx.to(device)).shape, generator: generator).to(device);
                var eps = randn(x0.shape, generator: generator).to(device);
                var t = DiffusionNoise.SampleTimesteps(o.UnetBatch, 0, noise.NumTrainTimesteps, device, generator);
                var noisy = noise.AddNoise(x0, eps, t);
                var context = te.Encode(batchIds, 1, applyFinalLayerNorm: true);
                var pred = unet.Predict(noisy, t, context);
                var loss = (pred - eps).pow(2).mean();
                lossValue = loss.item<float>();
                loss.backward();
            }
            nn.utils.clip_grad_norm_(all.Where(p => p.grad is not null), 1.0);
            double f = Cosine(step, o.UnetSteps, warmup);
            opt.Groups[0].LearningRate = o.UnetLearningRate * f;
            opt.Groups[1].LearningRate = o.TextEncoderLearningRate * f;
            opt.Step();
            opt.ZeroGrad();
            losses.Add(lossValue);
            ema = double.IsNaN(ema) ? lossValue : 0.98 * ema + 0.02 * lossValue;
            if (step % 8 == 7) { GC.Collect(); GC.WaitForPendingFinalizers(); }
            Progress?.Invoke(new DemoPretrainProgress("unet", step + 1, o.UnetSteps, lossValue, ema, sw.Elapsed));
            if ((step + 1) % Math.Max(1, o.UnetSteps / 10) == 0) _log($"unet step {step + 1}/{o.UnetSteps}: loss {ema:0.0000}, {sw.Elapsed.TotalSeconds / (step + 1):0.00} s/step");
        }
        unet.eval();
        te.eval();
        return losses;
    }
}
