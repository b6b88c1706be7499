using System.Diagnostics;
using System.Globalization;
using System.Text.Json;
using LoraSharp.Adapters;
using LoraSharp.Diffusion;
using LoraSharp.Formats;
using LoraSharp.Imaging;
using LoraSharp.IO;
using LoraSharp.Models.StableDiffusion;
using LoraSharp.Text;
using LoraSharp.Training.Optim;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Training.Diffusion;

/// <summary>One progress report (after every optimizer step).</summary>
public sealed record TrainProgress(int Epoch, int Epochs, long Step, long TotalSteps, double Loss, double AverageLoss, double LearningRate, double StepsPerSecond, TimeSpan Eta);

/// <summary>What a training run produced.</summary>
public sealed record SdTrainResult
{
    public required string AdapterPath { get; init; }
    public required IReadOnlyList<string> SavedAdapters { get; init; }
    public required IReadOnlyList<string> SampleImages { get; init; }
    public string? LossCurvePath { get; init; }
    public required IReadOnlyList<double> Losses { get; init; }
    public required long Steps { get; init; }
    public required int Epochs { get; init; }
    public MemoryPlan? MemoryPlan { get; init; }
    public required double SecondsPerStep { get; init; }
}

/// <summary>
/// kohya-style LoRA / LyCORIS training of Stable Diffusion 1.x, 2.x (v-prediction) and SDXL on TorchSharp:
/// folder dataset with buckets and captions, cached or on-the-fly VAE latents, DDPM noise with noise offset /
/// multi-resolution noise / min-SNR weights, UNet and text-encoder adapters with their own learning rates,
/// gradient accumulation and clipping, optional block checkpointing, adapters saved every N epochs in the kohya
/// layout with ss_* metadata and hashes, sample images, a loss curve and resumable state.
/// </summary>
public sealed class SdTrainer : IDisposable
{
    const string AdapterName = "lora";
    readonly SdTrainConfig _c;
    readonly Action<string> _log;
    StableDiffusionModel? _model;
    AdapterHost? _host;
    IGroupedOptimizer? _optimizer;
    readonly Dictionary<string, (Tensor Context, Tensor? Pooled)> _textCache = new(StringComparer.Ordinal);
    /// <summary>Captions encoded so far by <c>cache_text_encoder_outputs</c>.</summary>
    public int CachedTextEncoderOutputs => _textCache.Count;
    LatentCache? _cache;
    GradientCheckpointing? _checkpointing;
    Txt2ImgPipeline? _pipeline;

    /// <summary>Called after every optimizer step.</summary>
    public event Action<TrainProgress>? Progress;

    public SdTrainer(SdTrainConfig config, Action<string>? log = null)
    {
        config.Validate();
        _c = config;
        _log = log ?? (_ => { });
    }

    /// <summary>The loaded model (after <see cref="Train"/> started; the adapter stays attached).</summary>
    public StableDiffusionModel? Model => _model;
    public AdapterHost? Host => _host;
    /// <summary>The optimizer (after <see cref="Train"/> has built it): its groups show the learning rates, LoRA+ included.</summary>
    public IGroupedOptimizer? Optimizer => _optimizer;
    /// <summary>The last <c>scale_weight_norms</c> pass (null when it is off).</summary>
    public MaxNormReport? LastMaxNorm { get; private set; }

    static ScalarType ComputeDType(string mp) => mp switch { "bf16" => ScalarType.BFloat16, "fp16" => ScalarType.Float16, _ => ScalarType.Float32 };

    public SdTrainResult Train(CancellationToken cancel = default)
    {
        var c = _c;
        long seed = c.Seed ?? Random.Shared.NextInt64(0, 1L << 31);
        manual_seed(seed);
        var started = DateTimeOffset.UtcNow;
        Directory.CreateDirectory(c.OutputDir);

        // ---- data
        var data = TrainingDataset.Load(c);
        foreach (var p in data.Problems) _log("dataset: " + p);
        _log($"dataset: {data.Train.Count} train image(s) ({data.TrainImagesWithRepeats} with repeats), {data.Regularization.Count} regularisation image(s), " +
             $"buckets used: {string.Join(" ", data.Train.Concat(data.Regularization).Select(p => $"{p.Bucket.W}x{p.Bucket.H}").Distinct())}");

        // ---- model
        var dtype = ComputeDType(c.MixedPrecision);
        _model = StableDiffusionModel.Load(c.PretrainedModelNameOrPath, new StableDiffusionLoadOptions { DType = dtype });
        if (c.NoHalfVae && dtype != ScalarType.Float32) _model.Vae?.to(ScalarType.Float32);
        if (c.Vae is { } vaePath)
        {
            _model.ReplaceVaeWeights(vaePath);
            _log($"vae: weights from {vaePath}");
        }
        foreach (var ignored in c.IgnoredOptions) _log($"config: {ignored} — no effect in LoraSharp");
        var model = _model;
        var family = model.Family;
        bool sdxl = family == StableDiffusionFamily.SDXLBase;
        if (family is StableDiffusionFamily.SDXLRefiner or StableDiffusionFamily.Unknown)
            throw new LoraSharpException($"training a {family} model is not supported (SD1.x, SD2.x and SDXL base are)", c.PretrainedModelNameOrPath, "pretrained_model_name_or_path");
        if (model.Vae is null || (model.TextEncoder is null && model.TextEncoder2 is null))
            throw new LoraSharpException("the model needs a VAE and its text encoder(s)", c.PretrainedModelNameOrPath, "pretrained_model_name_or_path");
        var schedule = ScheduleFor(c.PretrainedModelNameOrPath);
        bool vpred = c.VParameterization || schedule.Prediction == PredictionType.VPrediction;
        schedule = schedule with { Prediction = vpred ? PredictionType.VPrediction : PredictionType.Epsilon };
        var noise = new DiffusionNoise(schedule, c.ZeroTerminalSnr);
        var (tok1, tok2) = LoadTokenizers(c, model);
        // Sample images and GenerateSample run through the txt2img pipeline on this very model (no weights copied):
        // the trained adapter takes part through its forward hooks.
        _pipeline = new Txt2ImgPipeline(model, tok1, tok2, loras: null, schedule)
        {
            ModelName = Directory.Exists(c.PretrainedModelNameOrPath) ? new DirectoryInfo(c.PretrainedModelNameOrPath).Name : Path.GetFileNameWithoutExtension(c.PretrainedModelNameOrPath),
        };
        _log($"model: {family}{(vpred ? " (v-prediction)" : "")}, {dtype}, UNet {StableDiffusionModel.ParameterCount(model.Unet) / 1e6:0.0}M parameters");

        // ---- network
        var spec = NetworkSpec.From(c);
        _host = new AdapterHost(model);
        var host = _host;
        host.FreezeBase();
        double unetLr = c.UnetLr ?? c.LearningRate, teLr = c.TextEncoderLr ?? c.LearningRate;
        bool trainUnet = !c.NetworkTrainTextEncoderOnly && unetLr > 0;
        bool trainTe = !c.NetworkTrainUnetOnly && teLr > 0;
        if (!trainUnet && !trainTe) throw new LoraSharpException("nothing to train: both learning rates are 0 or both parts are excluded", "config", "unet_lr");
        AttachedAdapter adapter;
        if (c.NetworkWeights is { Length: > 0 } nw)
        {
            using var loaded = AdapterFile.Read(nw, ModuleIndex.FromModule(model));
            adapter = host.Attach(loaded.Weights, AdapterName, options: new AttachOptions { Trainable = true });
            _log($"network: continued from {nw}: {adapter.Report}");
        }
        else
        {
            var selector = new ModuleSelector();
            if (trainUnet) selector.IncludeRegex(NetworkSpec.UnetAttentionPattern);
            if (trainUnet && spec.Conv) selector.IncludeRegex(NetworkSpec.UnetConvPattern);
            if (trainTe) selector.IncludeRegex(NetworkSpec.TextEncoderPattern);
            if ((spec.BlockDims ?? (object?)spec.BlockLrWeights) is not null && sdxl)
                throw new LoraSharpException("block_dims and block learning-rate weights describe the 25 blocks of an SD 1.x / 2.x UNet; SDXL is not supported", "config", "network_args");
            adapter = host.Create(AdapterName, spec.ConfigFor, selector);
        }
        var named = host.NamedTrainableParameters(AdapterName);
        var unetNamed = named.Where(p => ModulePathOf(p.Name).StartsWith("unet.", StringComparison.Ordinal)).ToList();
        var teNamed = named.Where(p => ModulePathOf(p.Name).StartsWith("text_encoder", StringComparison.Ordinal)).ToList();
        var unetParams = unetNamed.Select(p => p.Param).ToList();
        var teParams = teNamed.Select(p => p.Param).ToList();
        if (!trainUnet) foreach (var p in unetParams) p.requires_grad = false;
        if (!trainTe) foreach (var p in teParams) p.requires_grad = false;
        long adapterParams = named.Sum(p => p.Param.numel());
        _log($"network: {spec.Kind} dim {c.NetworkDim} alpha {c.NetworkAlpha}{(spec.Conv ? $" conv_dim {spec.Adapter.ConvRank} conv_alpha {spec.Adapter.ConvAlpha}" : "")}, " +
             $"{adapter.Modules.Count(m => m.ModulePath.StartsWith("unet.", StringComparison.Ordinal))} UNet + {adapter.Modules.Count(m => m.ModulePath.StartsWith("text_encoder", StringComparison.Ordinal))} text encoder modules, {adapterParams / 1e6:0.00}M parameters");

        // ---- memory plan
        string optimizerName = OptimizerFactory.Normalize(c.OptimizerType);
        bool checkpointing = c.GradientCheckpointing, cacheLatents = c.CacheLatents || c.CacheLatentsToDisk;
        bool randomCrop = data.Train.Concat(data.Regularization).Any(p => p.Image.Folder.RandomCrop ?? c.RandomCrop);
        MemoryPlan? plan = null;
        if (c.AutoMemory)
        {
            var maxBucket = data.Train.Concat(data.Regularization).Select(p => p.Bucket).MaxBy(b => (long)b.W * b.H);
            plan = MemoryPlanner.Plan(new MemoryPlanInput
            {
                Unet = model.Unet.Config,
                ModelBytes = model.parameters().Sum(p => p.numel() * p.element_size()),
                AdapterParameters = adapterParams,
                BatchSize = data.MaxBatchSize,
                MaxImageSize = maxBucket,
                ActivationBytes = dtype == ScalarType.Float32 ? 4 : 2,
                Optimizer = optimizerName,
            }, forceCheckpointing: c.GradientCheckpointing, forceCache: cacheLatents);
            checkpointing |= plan.GradientCheckpointing;
            cacheLatents |= plan.CacheLatents && !randomCrop; // a random crop is encoded every step
            if (plan.EightBitOptimizer && optimizerName == "AdamW") optimizerName = "AdamW8bit";
            _log(plan.ToString());
        }
        if (checkpointing) _checkpointing = GradientCheckpointing.Apply(model.Unet);

        // ---- optimizer
        var groups = new List<ParamGroup>();
        if (trainUnet && spec.BlockLrWeights is not null)
        {
            // kohya block-wise learning rates: one group per block weight (× LoRA+ for the up matrices)
            foreach (var g in unetNamed.GroupBy(p => spec.LrWeightOf(ModulePathOf(p.Name))).OrderBy(g => g.Key))
                AddGroups(g.Key == 1 ? "unet" : $"unet_lr{g.Key.ToString("0.###", CultureInfo.InvariantCulture)}", g.ToList(), unetLr * g.Key, spec.LoraPlusUnetRatio);
        }
        else if (trainUnet) AddGroups("unet", unetNamed, unetLr, spec.LoraPlusUnetRatio);
        if (trainTe) AddGroups("text_encoder", teNamed, teLr, spec.LoraPlusTextEncoderRatio);
        // LoRA+ (kohya networks.lora): the up matrices get their own group at lr × ratio
        void AddGroups(string name, List<(string Name, TorchSharp.Modules.Parameter Param)> ps, double lr, double? plusRatio)
        {
            bool IsUp((string Name, TorchSharp.Modules.Parameter Param) p) => plusRatio is not null && p.Name.EndsWith("/lora_up", StringComparison.Ordinal);
            var rest = ps.Where(p => !IsUp(p)).Select(p => p.Param).ToList();
            var up = ps.Where(IsUp).Select(p => p.Param).ToList();
            if (rest.Count > 0) groups.Add(new ParamGroup(name, rest, lr));
            if (up.Count > 0) groups.Add(new ParamGroup(name + "_lora_up", up, lr * plusRatio!.Value));
        }
        _optimizer = OptimizerFactory.Create(optimizerName, groups, c.OptimizerArgs);
        var optimizer = _optimizer;

        // ---- schedule of steps
        int batchesPerEpoch = data.BatchesPerEpoch(c.TrainBatchSize);
        int stepsPerEpoch = Math.Max(1, (batchesPerEpoch + c.GradientAccumulationSteps - 1) / c.GradientAccumulationSteps);
        long totalSteps = c.MaxTrainEpochs is { } me ? (long)me * stepsPerEpoch : c.MaxTrainSteps;
        int epochs = (int)((totalSteps + stepsPerEpoch - 1) / stepsPerEpoch);
        long warmup = LrSchedule.KohyaWarmupSteps(c.LrWarmupSteps, totalSteps);
        var lrSchedule = LrSchedule.Create(c.LrScheduler, warmup, totalSteps, c.LearningRate, c.LrSchedulerNumCycles, c.LrSchedulerPower);
        _log($"training: {epochs} epoch(s) × {stepsPerEpoch} step(s) = {totalSteps} steps, batch {c.TrainBatchSize} × accumulation {c.GradientAccumulationSteps}, " +
             $"{optimizer.Name}, lr unet {unetLr:G3} te {teLr:G3}, {c.LrScheduler} (warm-up {warmup}), checkpointing {(checkpointing ? "on" : "off")}, cached latents {(cacheLatents ? "on" : "off")}, seed {seed}");

        // ---- latents
        var vae = model.Vae!;
        vae.eval();
        _cache = new LatentCache(vae, c.CacheLatentsToDisk ? Path.Combine(c.OutputDir, "latent_cache") : null, keepInMemory: cacheLatents);
        if (cacheLatents)
        {
            var sw = Stopwatch.StartNew();
            foreach (var p in data.Train.Concat(data.Regularization))
            {
                _cache.Get(p).Dispose();
                if (p.Image.Folder.FlipAug ?? c.FlipAug) _cache.Get(p, flipped: true).Dispose();
            }
            _log($"latents: {_cache.Encoded} encoded, {_cache.DiskHits} read from disk in {sw.Elapsed.TotalSeconds:0.0} s");
        }

        // ---- resume
        using var generator = new Generator((ulong)seed + 1);
        long step = 0;
        int startEpoch = 0;
        if (c.Resume is { Length: > 0 } resume)
        {
            var st = TrainState.Load(resume, host, optimizer, generator);
            step = st.Step;
            startEpoch = st.Epoch;
            _log($"resumed from {resume}: epoch {st.Epoch}, step {st.Step}");
        }

        // ---- metadata shared by every save
        var metaBase = KohyaMetadata.Build(c, spec, data, family, vpred, seed, started, optimizer, unetLr, teLr, totalSteps, epochs, batchesPerEpoch, warmup, checkpointing, cacheLatents);
        var saved = new List<string>();
        // save_last_n_epochs / save_last_n_steps: an older save goes (if it is still there)
        void DeleteSave(string fileName)
        {
            var path = Path.Combine(c.OutputDir, fileName);
            if (File.Exists(path)) { File.Delete(path); saved.Remove(path); }
        }
        var samples = new List<string>();
        var losses = new List<double>();
        var captions = new CaptionProcessor(new CaptionSettings(c.ShuffleCaption, c.KeepTokens, c.CaptionDropoutRate, c.CaptionTagDropoutRate,
            c.CaptionDropoutEveryNEpochs, c.TokenWarmupMin, c.TokenWarmupStep, c.EnableWildcard, c.CaptionPrefix, c.CaptionSuffix,
            c.KeepTokensSeparator, c.CaptionSeparator, c.SecondarySeparator)) { TotalSteps = totalSteps };
        var sampleFile = c.SamplePrompts is { Length: > 0 } sp ? SamplePromptFile.Read(sp) : null;
        if (sampleFile is not null)
            foreach (var sampler in sampleFile.Select(p => p.Sampler ?? c.SampleSampler).Prepend(c.SampleSampler).Distinct())
                Samplers.Create(SamplePromptFile.SamplerName(sampler), 1).Dispose(); // an unknown sampler fails now, not after an epoch
        var swTotal = Stopwatch.StartNew();
        long stepsThisRun = 0;
        double emaLoss = double.NaN;

        for (int epoch = startEpoch; epoch < epochs && step < totalSteps; epoch++)
        {
            var rng = new Random(EpochSeed(seed, epoch));
            var batches = data.EpochBatches(c.TrainBatchSize, rng);
            model.Unet.train();
            model.TextEncoder?.train();
            model.TextEncoder2?.train();
            int accumulated = 0;
            double accLoss = 0;
            for (int bi = 0; bi < batches.Count && step < totalSteps; bi++)
            {
                cancel.ThrowIfCancellationRequested();
                double lossValue = TrainBatch(epoch + 1, step, batches[bi], captions, rng, noise, tok1, tok2, sdxl, vpred, trainTe, c.GradientAccumulationSteps, generator);
                accLoss += lossValue;
                accumulated++;
                bool last = bi == batches.Count - 1;
                if (accumulated < c.GradientAccumulationSteps && !last) continue;

                foreach (var g in optimizer.Groups)
                    g.LearningRate = g.BaseLearningRate * lrSchedule.Factor(step);
                if (c.MaxGradNorm > 0)
                    GradientClipping.ClipByGlobalNorm(optimizer.Groups.SelectMany(g => g.Parameters), c.MaxGradNorm);
                optimizer.Step();
                optimizer.ZeroGrad();
                if (c.ScaleWeightNorms is { } maxNorm) LastMaxNorm = MaxNormRegularization.Apply(adapter.Modules, maxNorm);
                step++;
                stepsThisRun++;
                double loss = accLoss / accumulated;
                accumulated = 0;
                accLoss = 0;
                losses.Add(loss);
                emaLoss = double.IsNaN(emaLoss) ? loss : 0.9 * emaLoss + 0.1 * loss;
                if (c.SaveEveryNSteps is { } everySteps && step % everySteps == 0 && step < totalSteps)
                {
                    saved.Add(SaveAdapter(StepFileName(step), metaBase, epoch + 1, step, sdxl));
                    if (c.SaveLastNSteps is { } keepSteps)
                    {
                        // kohya: the save of step (step − N − 1) rounded down to a save step goes; the last N steps' saves stay
                        long old = step - keepSteps - 1;
                        old -= old % everySteps;
                        if (old > 0) DeleteSave(StepFileName(old));
                    }
                    if (c.SaveState) TrainState.Save(Path.Combine(c.OutputDir, c.OutputName + "-state"), host, optimizer, epoch, step, seed, generator);
                }
                if (step % 8 == 0) { GC.Collect(); GC.WaitForPendingFinalizers(); }
                double sps = stepsThisRun / Math.Max(1e-9, swTotal.Elapsed.TotalSeconds);
                Progress?.Invoke(new TrainProgress(epoch + 1, epochs, step, totalSteps, loss, emaLoss, optimizer.Groups[0].LearningRate, sps,
                    TimeSpan.FromSeconds((totalSteps - step) / Math.Max(sps, 1e-9))));
            }

            int epochNo = epoch + 1;
            bool finalEpoch = epochNo == epochs || step >= totalSteps;
            if (c.SaveEveryNEpochs is { } every && epochNo % every == 0 && !finalEpoch)
            {
                saved.Add(SaveAdapter(EpochFileName(epochNo), metaBase, epochNo, step, sdxl));
                if (c.SaveLastNEpochs is { } keep)
                {
                    int old = epochNo - keep * every;
                    if (old > 0) DeleteSave(EpochFileName(old));
                }
                if (c.SaveState) TrainState.Save(Path.Combine(c.OutputDir, c.OutputName + "-state"), host, optimizer, epochNo, step, seed, generator);
            }
            if (sampleFile is not null && c.SampleEveryNEpochs is { } se && epochNo % se == 0)
                samples.AddRange(SampleImages(sampleFile, epochNo, seed));
        }

        var final = SaveAdapter(c.OutputName + "." + Extension(c.SaveModelAs), metaBase, epochs, step, sdxl);
        saved.Add(final);
        if (c.SaveState) TrainState.Save(Path.Combine(c.OutputDir, c.OutputName + "-state"), host, optimizer, epochs, step, seed, generator);
        string? curve = null;
        if (losses.Count > 0)
        {
            curve = Path.Combine(c.OutputDir, c.OutputName + "_loss.png");
            LossCurve.Save(curve, losses, $"{c.OutputName}: {spec.Kind} dim {c.NetworkDim}, {optimizer.Name}");
        }
        return new SdTrainResult
        {
            AdapterPath = final, SavedAdapters = saved, SampleImages = samples, LossCurvePath = curve, Losses = losses, Steps = step, Epochs = epochs,
            MemoryPlan = plan, SecondsPerStep = stepsThisRun == 0 ? 0 : swTotal.Elapsed.TotalSeconds / stepsThisRun,
        };
    }

    /// <summary>The seed of an epoch's shuffling and caption randomness: a fixed mix of the run's seed and the epoch
    /// (not HashCode.Combine, which is randomised per process), so a seed gives the same run in every process.</summary>
    internal static int EpochSeed(long seed, int epoch)
    {
        ulong z = unchecked((ulong)seed * 0x9E3779B97F4A7C15UL + (ulong)epoch);
        z = unchecked((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9UL);
        z = unchecked((z ^ (z >> 27)) * 0x94D049BB133111EBUL);
        return (int)((z ^ (z >> 31)) & int.MaxValue);
    }

    static string ModulePathOf(string namedParameter)
    {
        // "adapter/module path/parameter"
        int a = namedParameter.IndexOf('/');
        int b = namedParameter.LastIndexOf('/');
        return namedParameter[(a + 1)..b];
    }

    string EpochFileName(int epoch) => $"{_c.OutputName}-{epoch:000000}.{Extension(_c.SaveModelAs)}";
    /// <summary>kohya random_crop: the bucket-sized window anywhere in the resized image (instead of its centre), uniform per step.</summary>
    internal static PlacedImage RandomCrop(PlacedImage p, Random rng)
    {
        var pl = p.Placement;
        return p with
        {
            Placement = pl with
            {
                CropLeft = rng.Next(0, Math.Max(0, pl.ResizedWidth - pl.BucketWidth) + 1),
                CropTop = rng.Next(0, Math.Max(0, pl.ResizedHeight - pl.BucketHeight) + 1),
            },
        };
    }

    /// <summary>kohya's step save name: &lt;output_name&gt;-step&lt;step:08&gt;.</summary>
    string StepFileName(long step) => $"{_c.OutputName}-step{step:00000000}.{Extension(_c.SaveModelAs)}";
    static string Extension(string saveAs) => saveAs;

    static ScheduleConfig ScheduleFor(string modelPath)
    {
        var json = Path.Combine(modelPath, "scheduler", "scheduler_config.json");
        return Directory.Exists(modelPath) && File.Exists(json) ? ScheduleConfig.FromDiffusersJson(json) with { Spacing = null } : ScheduleConfig.StableDiffusion;
    }

    /// <summary>
    /// The model's tokenizer(s), as the txt2img pipeline loads them (SD2 and SDXL's second tokenizer pad with 0):
    /// <c>tokenizer_path</c> (a tokenizer folder, or a folder with <c>tokenizer/</c> [+ <c>tokenizer_2/</c>]), else the diffusers folder's.
    /// </summary>
    static (ClipTokenizer, ClipTokenizer?) LoadTokenizers(SdTrainConfig c, StableDiffusionModel model)
    {
        string? root = Directory.Exists(c.PretrainedModelNameOrPath) ? c.PretrainedModelNameOrPath : null, folder = null;
        if (c.TokenizerPath is { Length: > 0 } tp)
        {
            if (!Directory.Exists(tp)) throw new LoraSharpException("tokenizer folder not found", tp, "tokenizer_path");
            if (Directory.Exists(Path.Combine(tp, "tokenizer"))) root = tp;
            else folder = tp;
        }
        if (folder is null && (root is null || !Directory.Exists(Path.Combine(root, "tokenizer"))))
            throw new LoraSharpException("no tokenizer folder found next to the model; give the CLIP tokenizer folder (vocab.json + merges.txt) with tokenizer_path",
                c.PretrainedModelNameOrPath, "tokenizer_path");
        return Txt2ImgPipeline.LoadTokenizers(model, root, folder);
    }

    /// <summary>Text conditioning for captions: SD1/2 [B, 77, C] (clip skip, final norm); SDXL context + pooled embeds.</summary>
    (Tensor Context, Tensor? Pooled) EncodeText(IReadOnlyList<string> texts, ClipTokenizer tok1, ClipTokenizer? tok2, bool sdxl)
    {
        var model = _model!;
        var device = model.Unet.parameters().First().device;
        // max_token_length 150 / 225: n chunks of 75 tokens per caption, encoded as one batch and joined (LongCaptions)
        int chunks = _c.MaxTokenLength is { } mtl ? mtl / (tok1.MaxLength - 2) : 1;
        Tensor Ids(ClipTokenizer t) => chunks > 1
            ? LongCaptions.BatchIds(t, texts, _c.MaxTokenLength!.Value, device)
            : tensor(texts.SelectMany(s => t.Encode(s).Select(i => (long)i)).ToArray(), dtype: ScalarType.Int64, device: device).reshape(texts.Count, t.MaxLength);
        Tensor Join(Tensor states) => chunks > 1 ? LongCaptions.Merge(states, texts.Count) : states;
        if (!sdxl)
        {
            var te = model.TextEncoder!;
            return (Join(te.Encode(Ids(tok1), _c.ClipSkip ?? 1, applyFinalLayerNorm: true)), null);
        }
        using var o1 = model.TextEncoder!.call(Ids(tok1));
        using var o2 = model.TextEncoder2!.call(Ids(tok2!));
        int skip = Math.Max(2, _c.ClipSkip ?? 2);
        var ctx = cat([Join(o1.HiddenStates[o1.HiddenStates.Count - skip]), Join(o2.HiddenStates[o2.HiddenStates.Count - skip])], -1);
        // the pooled embedding is the first chunk's (kohya: pool2[::n])
        var pooled = chunks > 1 ? o2.TextEmbeds!.index_select(0, arange(0, (long)texts.Count * chunks, chunks, dtype: ScalarType.Int64, device: device)) : o2.TextEmbeds!.clone();
        return (ctx, pooled);
    }

    double TrainBatch(int epoch, long step, List<PlacedImage> batch, CaptionProcessor captions, Random rng, DiffusionNoise noise, ClipTokenizer tok1, ClipTokenizer? tok2,
        bool sdxl, bool vpred, bool trainTe, int accumulation, Generator generator)
    {
        var c = _c;
        var model = _model!;
        using var scope = NewDisposeScope();
        var unetParam = model.Unet.parameters().First();
        var device = unetParam.device;
        batch = batch.Select(p => p.Image.Folder.RandomCrop ?? c.RandomCrop ? RandomCrop(p, rng) : p).ToList();
        // flip_aug: a coin per sample (drawn only for samples whose subset flips, so other runs keep their random sequence)
        var latents = stack(batch.Select(p => _cache!.Get(p, flipped: (p.Image.Folder.FlipAug ?? c.FlipAug) && rng.NextDouble() < 0.5)).ToArray()).to(device);
        var texts = batch.Select(p => captions.Process(p.Image, rng, epoch, step)).ToList();
        Tensor context, pooled;
        if (trainTe) { var (ctx, pl) = EncodeText(texts, tok1, tok2, sdxl); context = ctx; pooled = pl!; }
        else
        {
            using var _ = no_grad();
            if (c.CacheTextEncoderOutputs)
            {
                // cache_text_encoder_outputs: each distinct caption is encoded once (captions are fixed: Validate checks)
                var encoded = texts.Select(text =>
                {
                    if (!_textCache.TryGetValue(text, out var hit))
                    {
                        var (ctx1, pl1) = EncodeText([text], tok1, tok2, sdxl);
                        hit = (ctx1.DetachFromDisposeScope(), pl1?.DetachFromDisposeScope());
                        _textCache[text] = hit;
                    }
                    return hit;
                }).ToList();
                context = cat(encoded.Select(e => e.Context).ToArray(), 0);
                pooled = sdxl ? cat(encoded.Select(e => e.Pooled!).ToArray(), 0) : null!;
            }
            else
            {
                var (ctx, pl) = EncodeText(texts, tok1, tok2, sdxl);
                context = ctx; pooled = pl!;
            }
        }
        long b = latents.shape[0];
        var eps = randn(latents.shape, generator: generator).to(device);
        if (c.NoiseOffset > 0)
        {
            double offset = c.NoiseOffsetRandomStrength ? rand([1], generator: generator).item<float>() * c.NoiseOffset : c.NoiseOffset;
            eps = c.AdaptiveNoiseScale is { } adaptive
                ? DiffusionNoise.ApplyAdaptiveNoiseOffset(eps, latents, offset, adaptive, generator)
                : DiffusionNoise.ApplyNoiseOffset(eps, offset, generator);
        }
        if (c.MultiresNoiseIterations > 0) eps = DiffusionNoise.PyramidNoise(eps, c.MultiresNoiseIterations, c.MultiresNoiseDiscount, rng, generator);
        var t = DiffusionNoise.SampleTimesteps(b, c.MinTimestep, c.MaxTimestep, device, generator);
        var inputNoise = eps;
        if (c.IpNoiseGamma is > 0 and var ip)
        {
            // input perturbation: the UNet sees x0 noised with ε + γ·ξ, the target stays ε (kohya ip_noise_gamma)
            double strength = c.IpNoiseGammaRandomStrength ? rand([1], generator: generator).item<float>() * ip : ip;
            inputNoise = eps + strength * randn(latents.shape, generator: generator).to(device);
        }
        var noisy = noise.AddNoise(latents, inputNoise, t).to_type(unetParam.dtype);
        Tensor? timeIds = null;
        if (sdxl)
        {
            timeIds = tensor(batch.SelectMany(p => new float[] { p.OriginalHeight, p.OriginalWidth, p.Placement.CropTop, p.Placement.CropLeft, p.Placement.BucketHeight, p.Placement.BucketWidth })
                .ToArray(), device: device).reshape(b, 6);
        }
        var pred = model.Unet.Predict(noisy, t, context.to_type(unetParam.dtype), sdxl ? pooled.to_type(unetParam.dtype) : null, timeIds).to_type(ScalarType.Float32);
        var target = vpred ? noise.VelocityTarget(latents, eps, t) : eps.to_type(ScalarType.Float32);
        var huberC = c.LossType is "huber" or "smooth_l1" ? noise.HuberThreshold(t, c.HuberSchedule, c.HuberC, c.HuberScale) : null;
        var perSample = DiffusionNoise.Loss(pred, target, c.LossType, huberC).mean([1, 2, 3]);
        var weights = tensor(batch.Select(p => p.Image.IsRegularization ? (float)c.PriorLossWeight : 1f).ToArray(), device: device);
        perSample = perSample * weights;
        if (c.MinSnrGamma is { } gamma) perSample = perSample * noise.MinSnrWeights(t, gamma, vpred).to(device);
        perSample = noise.SnrLossTerms(perSample, t, c.ScaleVPredLossLikeNoisePred, c.VPredLikeLoss, c.DebiasedEstimationLoss);
        var loss = perSample.mean();
        (loss / accumulation).backward();
        return loss.item<float>();
    }

    string SaveAdapter(string fileName, Dictionary<string, string> metaBase, int epoch, long step, bool sdxl)
    {
        var c = _c;
        var path = Path.Combine(c.OutputDir, fileName);
        var meta = new Dictionary<string, string>(metaBase, StringComparer.Ordinal)
        {
            ["ss_epoch"] = epoch.ToString(CultureInfo.InvariantCulture),
            ["ss_steps"] = step.ToString(CultureInfo.InvariantCulture),
            ["ss_training_finished_at"] = DateTimeOffset.UtcNow.ToUnixTimeSeconds().ToString(CultureInfo.InvariantCulture),
        };
        using var weights = _host![AdapterName].Export();
        var options = new KohyaWriteOptions
        {
            Metadata = meta,
            NameOf = KohyaNames(_model!, sdxl),
            SaveDType = c.SavePrecision switch { "fp16" => ScalarType.Float16, "bf16" => ScalarType.BFloat16, "float" => ScalarType.Float32, _ => null },
        };
        if (c.SaveModelAs == "safetensors")
        {
            KohyaAdapterWriter.Write(path, weights, options);
        }
        else
        {
            var tmp = path + ".tmp.safetensors";
            try
            {
                KohyaAdapterWriter.Write(tmp, weights, options);
                using var src = SafetensorsFile.Open(tmp);
                TorchCheckpointWriter.Write(path, src.Keys.Select(k => new KeyValuePair<string, Tensor>(k, src.Load(k))).ToList());
            }
            finally { File.Delete(tmp); }
        }
        _log($"saved {path}");
        return path;
    }

    /// <summary>kohya names: SDXL UNet modules by their SGM path (lora_unet_input_blocks_…), text encoders lora_te1_/lora_te2_ for SDXL.</summary>
    public static Func<string, string?> KohyaNames(StableDiffusionModel model, bool sdxl)
    {
        if (!sdxl) return p => KohyaAdapterWriter.KohyaName(p, false);
        var map = LdmKeyMap.ForUNet(model.Unet.Config);
        return p =>
        {
            if (!p.StartsWith("unet.", StringComparison.Ordinal)) return KohyaAdapterWriter.KohyaName(p, true);
            var ldm = map.ToLdm(p["unet.".Length..]) ?? throw new LoraSharpException($"no SGM name for UNet module '{p}'", key: p);
            return "lora_unet_" + ldm.Replace('.', '_');
        };
    }

    /// <summary>
    /// The txt2img pipeline over the trainer's in-memory model and tokenizers (after <see cref="Train"/> has loaded
    /// the model). It copies no weights: the trainer's adapter runs through its hooks, so images show it as trained so
    /// far (switch it off with <c>Host["lora"].Enabled = false</c>). Call <c>Model.eval()</c> first when the model is in
    /// training mode (adapter dropouts).
    /// </summary>
    public Txt2ImgPipeline Pipeline => _pipeline ?? throw new InvalidOperationException("the model is loaded by Train(); call it first");

    /// <summary>The txt2img request of a kohya sample prompt (sampler <c>--ss</c> or <c>sample_sampler</c>, clip skip from the config).</summary>
    public Txt2ImgRequest SampleRequest(SamplePrompt prompt, long seed, bool decode = true) => new()
    {
        Prompt = prompt.Prompt,
        NegativePrompt = prompt.NegativePrompt,
        Steps = prompt.Steps,
        Sampler = SamplePromptFile.SamplerName(prompt.Sampler ?? _c.SampleSampler),
        CfgScale = prompt.CfgScale,
        Seed = seed,
        Width = prompt.Width,
        Height = prompt.Height,
        ClipSkip = _c.ClipSkip ?? 1,
        ClipSkipOnSd2 = true, // the conditioning the adapter was trained with (kohya's samples do the same)
        Decode = decode,
    };

    /// <summary>
    /// kohya's sample images after an epoch: <c>output_dir/sample/&lt;output_name&gt;_e&lt;epoch:6&gt;_&lt;index:2&gt;_&lt;yyyyMMddHHmmss&gt;_&lt;seed&gt;.png</c>
    /// with A1111 parameters; a prompt without <c>--d</c> uses the training seed + its index.
    /// </summary>
    List<string> SampleImages(List<SamplePrompt> prompts, int epoch, long seed)
    {
        var dir = Path.Combine(_c.OutputDir, "sample");
        Directory.CreateDirectory(dir);
        var stamp = DateTime.Now.ToString("yyyyMMddHHmmss", CultureInfo.InvariantCulture);
        var files = new List<string>();
        for (int i = 0; i < prompts.Count; i++)
        {
            long s = prompts[i].Seed ?? seed + i;
            using var result = RunSample(SampleRequest(prompts[i], s));
            var path = Path.Combine(dir, $"{_c.OutputName}_e{epoch:000000}_{i:00}_{stamp}_{s}.png");
            PngImage.Save(result.Images![0], path, result.Parameters[0]);
            files.Add(path);
        }
        _log($"samples: {files.Count} image(s) in {dir}");
        return files;
    }

    /// <summary>Runs the pipeline with the networks in eval mode (no dropouts), restoring their modes afterwards.</summary>
    Txt2ImgResult RunSample(Txt2ImgRequest request)
    {
        var model = _model ?? throw new InvalidOperationException("train first");
        var parts = new nn.Module?[] { model.Unet, model.TextEncoder, model.TextEncoder2 }.OfType<nn.Module>().Select(m => (Module: m, Training: m.training)).ToList();
        foreach (var (m, _) in parts) m.eval();
        try { return Pipeline.Generate(request); }
        finally { foreach (var (m, training) in parts) if (training) m.train(); }
    }

    /// <summary>Generates one image [3, H, W] in [−1, 1] through <see cref="Pipeline"/> with the adapters as attached — for tests and tools.</summary>
    public Tensor GenerateSample(SamplePrompt prompt, long seed)
    {
        using var result = RunSample(SampleRequest(prompt, seed));
        return result.Images![0].clone();
    }

    /// <summary>The sampled latents [1, C, H/8, W/8] (scaled, float32) for a prompt, before VAE decoding.</summary>
    public Tensor GenerateSampleLatents(SamplePrompt prompt, long seed)
    {
        using var result = RunSample(SampleRequest(prompt, seed, decode: false));
        return result.Latents.clone();
    }

    public void Dispose()
    {
        foreach (var (ctx, pooled) in _textCache.Values) { ctx.Dispose(); pooled?.Dispose(); }
        _textCache.Clear();
        _pipeline?.Dispose();
        _checkpointing?.Dispose();
        _cache?.Dispose();
        _optimizer?.Dispose();
        _host?.Dispose();
        _model?.Dispose();
    }
}
