using System.Globalization;
using System.Text.Json;
using LoraSharp.Formats;
using LoraSharp.Models.StableDiffusion;
using LoraSharp.Training.Optim;

namespace LoraSharp.Training.Diffusion;

/// <summary>The ss_* and modelspec.* metadata kohya's train_network.py writes, from a LoraSharp run.</summary>
public static class KohyaMetadata
{
    static string S(double v) => v.ToString("R", CultureInfo.InvariantCulture);
    static string S(long v) => v.ToString(CultureInfo.InvariantCulture);
    static string B(bool v) => v ? "True" : "False";
    /// <summary>A float as Python's str() writes it (kohya stores args with str): 1 → "1.0", 0.1 → "0.1".</summary>
    static string PyFloat(double v) => double.IsFinite(v) && v == Math.Floor(v) && Math.Abs(v) < 1e16 ? v.ToString("0.0", CultureInfo.InvariantCulture) : S(v);

    /// <summary>kohya's optimizer description: the Python class path and its arguments.</summary>
    public static string OptimizerDescription(IGroupedOptimizer o, IEnumerable<string> args)
    {
        var cls = o.Name switch
        {
            "AdamW" => "torch.optim.adamw.AdamW",
            "AdamW8bit" => "bitsandbytes.optim.adamw.AdamW8bit",
            "Lion" => "lion_pytorch.lion_pytorch.Lion",
            "Prodigy" => "prodigyopt.prodigy.Prodigy",
            "Adafactor" => "transformers.optimization.Adafactor",
            var n => n,
        };
        var a = args.ToList();
        return a.Count == 0 ? cls : $"{cls}({string.Join(",", a)})";
    }

    public static Dictionary<string, string> Build(SdTrainConfig c, NetworkSpec spec, TrainingDataset data, StableDiffusionFamily family, bool vpred, long seed,
        DateTimeOffset started, IGroupedOptimizer optimizer, double unetLr, double teLr, long totalSteps, int epochs, int batchesPerEpoch, long warmup,
        bool checkpointing, bool cacheLatents)
    {
        bool sdxl = family == StableDiffusionFamily.SDXLBase, v2 = family == StableDiffusionFamily.SD2 || c.V2;
        string baseVersion = sdxl ? "sdxl_base_v1-0" : v2 ? "sd_v2" : "sd_v1";
        string arch = sdxl ? "stable-diffusion-xl-v1-base" : v2 ? (vpred ? "stable-diffusion-v2-768-v" : "stable-diffusion-v2-512") : "stable-diffusion-v1";
        string modelName = Path.GetFileName(Path.TrimEndingDirectorySeparator(c.PretrainedModelNameOrPath));
        var datasetDirs = data.Folders.Where(f => !f.IsRegularization).ToDictionary(f => f.Name,
            f => new { n_repeats = f.Repeats, img_count = data.Train.Count(p => p.Image.Folder == f) });
        var regDirs = data.Folders.Where(f => f.IsRegularization).ToDictionary(f => f.Name,
            f => new { n_repeats = f.Repeats, img_count = data.Regularization.Count(p => p.Image.Folder == f) });
        var bucketInfo = new
        {
            buckets = data.Train.Concat(data.Regularization).GroupBy(p => p.Bucket).OrderBy(g => g.Key.W).ThenBy(g => g.Key.H)
                .Select((g, i) => new { i, resolution = new[] { g.Key.W, g.Key.H }, count = g.Sum(p => p.Image.Folder.Repeats) })
                .ToDictionary(x => x.i.ToString(CultureInfo.InvariantCulture), x => new { x.resolution, x.count }),
            mean_img_ar_error = 0.0,
        };
        var m = new Dictionary<string, string>(StringComparer.Ordinal)
        {
            ["ss_session_id"] = S(Random.Shared.NextInt64(0, 1L << 31)),
            ["ss_training_started_at"] = S(started.ToUnixTimeSeconds()),
            ["ss_output_name"] = c.OutputName,
            ["ss_learning_rate"] = S(c.LearningRate),
            ["ss_text_encoder_lr"] = S(teLr),
            ["ss_unet_lr"] = S(unetLr),
            ["ss_num_train_images"] = S(data.TrainImagesWithRepeats),
            ["ss_num_reg_images"] = S(data.RegImagesWithRepeats),
            ["ss_num_batches_per_epoch"] = S(batchesPerEpoch),
            ["ss_num_epochs"] = S(epochs),
            ["ss_gradient_checkpointing"] = B(checkpointing),
            ["ss_gradient_accumulation_steps"] = S(c.GradientAccumulationSteps),
            ["ss_max_train_steps"] = S(totalSteps),
            ["ss_lr_warmup_steps"] = S(warmup),
            ["ss_lr_scheduler"] = c.LrScheduler,
            ["ss_network_module"] = spec.KohyaModule,
            ["ss_network_dim"] = S(c.NetworkDim),
            ["ss_network_alpha"] = S(c.NetworkAlpha),
            ["ss_network_dropout"] = c.NetworkDropout is { } nd ? S(nd) : "None",
            ["ss_network_args"] = spec.ArgsJson(),
            ["ss_mixed_precision"] = c.MixedPrecision,
            ["ss_full_fp16"] = "False",
            ["ss_v2"] = B(v2),
            ["ss_base_model_version"] = baseVersion,
            ["ss_v_parameterization"] = B(vpred),
            ["ss_clip_skip"] = c.ClipSkip is { } cs ? S(cs) : "None",
            ["ss_max_token_length"] = c.MaxTokenLength is { } mtl ? S(mtl) : "None",
            ["ss_cache_latents"] = B(cacheLatents),
            ["ss_seed"] = S(seed),
            ["ss_lowram"] = "False",
            ["ss_noise_offset"] = c.NoiseOffset > 0 ? S(c.NoiseOffset) : "None",
            ["ss_multires_noise_iterations"] = c.MultiresNoiseIterations > 0 ? S(c.MultiresNoiseIterations) : "None",
            ["ss_multires_noise_discount"] = S(c.MultiresNoiseDiscount),
            ["ss_adaptive_noise_scale"] = c.AdaptiveNoiseScale is { } ans ? PyFloat(ans) : "None",
            ["ss_noise_offset_random_strength"] = B(c.NoiseOffsetRandomStrength),
            ["ss_zero_terminal_snr"] = B(c.ZeroTerminalSnr),
            ["ss_min_snr_gamma"] = c.MinSnrGamma is { } g ? S(g) : "None",
            ["ss_ip_noise_gamma"] = c.IpNoiseGamma is { } ip ? PyFloat(ip) : "None",
            ["ss_ip_noise_gamma_random_strength"] = B(c.IpNoiseGammaRandomStrength),
            ["ss_debiased_estimation"] = B(c.DebiasedEstimationLoss),
            ["ss_loss_type"] = c.LossType,
            ["ss_huber_schedule"] = c.HuberSchedule,
            ["ss_huber_scale"] = PyFloat(c.HuberScale),
            ["ss_huber_c"] = PyFloat(c.HuberC),
            ["ss_training_comment"] = c.TrainingComment ?? "None",
            ["ss_sd_scripts_commit_hash"] = "LoraSharp",
            ["ss_optimizer"] = OptimizerDescription(optimizer, c.OptimizerArgs),
            ["ss_max_grad_norm"] = S(c.MaxGradNorm),
            ["ss_caption_dropout_rate"] = S(c.CaptionDropoutRate),
            ["ss_caption_dropout_every_n_epochs"] = S(c.CaptionDropoutEveryNEpochs),
            ["ss_caption_tag_dropout_rate"] = PyFloat(c.CaptionTagDropoutRate),
            ["ss_face_crop_aug_range"] = "None",
            ["ss_prior_loss_weight"] = S(c.PriorLossWeight),
            ["ss_scale_weight_norms"] = c.ScaleWeightNorms is { } swn ? PyFloat(swn) : "None",
            ["ss_min_timestep"] = S(c.MinTimestep),
            ["ss_max_timestep"] = S(c.MaxTimestep),
            ["ss_resolution"] = $"({c.Resolution.W}, {c.Resolution.H})",
            ["ss_enable_bucket"] = B(c.EnableBucket),
            ["ss_min_bucket_reso"] = S(c.MinBucketReso),
            ["ss_max_bucket_reso"] = S(c.MaxBucketReso),
            ["ss_bucket_no_upscale"] = B(c.BucketNoUpscale),
            ["ss_bucket_info"] = JsonSerializer.Serialize(bucketInfo),
            ["ss_keep_tokens"] = S(c.KeepTokens),
            ["ss_shuffle_caption"] = B(c.ShuffleCaption),
            ["ss_flip_aug"] = B(c.FlipAug),
            ["ss_color_aug"] = "False",
            ["ss_random_crop"] = B(c.RandomCrop),
            ["ss_caption_extension"] = c.CaptionExtension,
            ["ss_tag_frequency"] = JsonSerializer.Serialize(FolderDataset.TagFrequency(data.Train.Select(p => p.Image).Distinct())),
            ["ss_dataset_dirs"] = JsonSerializer.Serialize(datasetDirs),
            ["ss_reg_dataset_dirs"] = JsonSerializer.Serialize(regDirs),
            ["ss_sd_model_name"] = modelName,
            ["ss_total_batch_size"] = S(c.TrainBatchSize * c.GradientAccumulationSteps),
            ["modelspec.sai_model_spec"] = "1.0.0",
            ["modelspec.architecture"] = arch + "/" + (spec.Kind == "lora" || spec.Kind == "dylora" ? "lora" : "lycoris"),
            ["modelspec.implementation"] = sdxl ? "https://github.com/Stability-AI/generative-models" : "diffusers",
            ["modelspec.title"] = c.OutputName,
            ["modelspec.resolution"] = $"{c.Resolution.W}x{c.Resolution.H}",
            ["modelspec.date"] = started.ToString("yyyy-MM-ddTHH:mm:ss", CultureInfo.InvariantCulture),
            ["modelspec.prediction_type"] = vpred ? "v" : "epsilon",
            ["modelspec.implementation_version"] = "LoraSharp",
        };
        if (c.ClipSkip is { } skip) m["modelspec.encoder_layer"] = S(skip);
        if (c.TrainingComment is { } tc) m["modelspec.description"] = tc;
        if (File.Exists(c.PretrainedModelNameOrPath))
        {
            try { m["ss_sd_model_hash"] = AdapterHashes.LegacyHash(c.PretrainedModelNameOrPath); }
            catch (IOException) { }
        }
        return m;
    }
}
