using System.Globalization;
using Tomlyn;
using Tomlyn.Model;

namespace LoraSharp.Training.Diffusion;

/// <summary>
/// Options of <c>lorasharp train</c>, with kohya sd-scripts' names (train_network.py / sdxl_train_network.py) and
/// defaults. Read from a TOML file (<see cref="FromToml"/>: top-level keys, or keys inside any table — kohya's
/// <c>--config_file</c> sections are ignored the same way) and/or command-line flags (<see cref="ApplyArgs"/>).
/// Unknown keys are an error listing the valid ones.
/// </summary>
public sealed class SdTrainConfig
{
    // model
    public string PretrainedModelNameOrPath { get; set; } = "";
    /// <summary>CLIP tokenizer folder (vocab.json + merges.txt, or bpe_simple_vocab_16e6.txt); default: the model folder's tokenizer/.</summary>
    public string? TokenizerPath { get; set; }
    public bool V2 { get; set; }
    public bool VParameterization { get; set; }
    public int? ClipSkip { get; set; }

    // data
    public string TrainDataDir { get; set; } = "";
    /// <summary>kohya's dataset config TOML (<see cref="Diffusion.DatasetConfig"/>); replaces train_data_dir / reg_data_dir.</summary>
    public string? DatasetConfig { get; set; }
    public string? RegDataDir { get; set; }
    public string OutputDir { get; set; } = "";
    public string OutputName { get; set; } = "last";
    public (int W, int H) Resolution { get; set; } = (512, 512);
    public bool EnableBucket { get; set; }
    public int MinBucketReso { get; set; } = 256;
    public int MaxBucketReso { get; set; } = 1024;
    public int BucketResoSteps { get; set; } = 64;
    public bool BucketNoUpscale { get; set; }
    public string CaptionExtension { get; set; } = ".caption";
    public bool ShuffleCaption { get; set; }
    public int KeepTokens { get; set; }
    public double CaptionDropoutRate { get; set; }
    public double PriorLossWeight { get; set; } = 1.0;
    /// <summary>What to do with an unreadable, tiny, CMYK or transparent image: "skip" (report and skip) or "fail".</summary>
    public string BadImages { get; set; } = "skip";

    // network
    public string NetworkModule { get; set; } = "networks.lora";
    public List<string> NetworkArgs { get; set; } = [];
    public int NetworkDim { get; set; } = 4;
    public double NetworkAlpha { get; set; } = 1;
    public int? ConvDim { get; set; }
    public double? ConvAlpha { get; set; }
    public double? NetworkDropout { get; set; }
    public double? RankDropout { get; set; }
    public double? ModuleDropout { get; set; }
    public string? NetworkWeights { get; set; }
    public bool DimFromWeights { get; set; }
    public bool NetworkTrainUnetOnly { get; set; }
    public bool NetworkTrainTextEncoderOnly { get; set; }

    // optimisation
    public double LearningRate { get; set; } = 2e-6;
    public double? UnetLr { get; set; }
    public double? TextEncoderLr { get; set; }
    public string OptimizerType { get; set; } = "AdamW";
    public List<string> OptimizerArgs { get; set; } = [];
    public string LrScheduler { get; set; } = "constant";
    /// <summary>Warm-up steps; a value below 1 is a ratio of the total steps (kohya).</summary>
    public double LrWarmupSteps { get; set; }
    public int LrSchedulerNumCycles { get; set; } = 1;
    public double LrSchedulerPower { get; set; } = 1;
    public double MaxGradNorm { get; set; } = 1.0;
    public int? MaxTrainEpochs { get; set; }
    public int MaxTrainSteps { get; set; } = 1600;
    public int TrainBatchSize { get; set; } = 1;
    public int GradientAccumulationSteps { get; set; } = 1;
    public bool GradientCheckpointing { get; set; }
    public string MixedPrecision { get; set; } = "no";
    public bool CacheLatents { get; set; }
    public bool CacheLatentsToDisk { get; set; }
    /// <summary>Pick gradient checkpointing, latent caching and 8-bit optimizer states to fit the available memory.</summary>
    public bool AutoMemory { get; set; } = true;

    // noise / loss
    public double NoiseOffset { get; set; }
    public int MultiresNoiseIterations { get; set; }
    public double MultiresNoiseDiscount { get; set; } = 0.3;
    public double? MinSnrGamma { get; set; }
    public int MinTimestep { get; set; }
    public int MaxTimestep { get; set; } = 1000;
    public long? Seed { get; set; }
    /// <summary>kohya input perturbation: the UNet input is noised with ε + γ·N(0, 1) while the target stays ε.</summary>
    public double? IpNoiseGamma { get; set; }
    /// <summary>γ drawn uniformly from [0, ip_noise_gamma) per step.</summary>
    public bool IpNoiseGammaRandomStrength { get; set; }
    /// <summary>Rescale the training schedule's betas to zero terminal SNR (Lin et al. 2023, kohya's fix).</summary>
    public bool ZeroTerminalSnr { get; set; }
    /// <summary>noise_offset is scaled by U(0, 1) per step.</summary>
    public bool NoiseOffsetRandomStrength { get; set; }
    /// <summary>The noise offset grows by this × |mean of the latent| per (sample, channel).</summary>
    public double? AdaptiveNoiseScale { get; set; }
    /// <summary>Weight each sample's loss by 1/√SNR (SNR capped at 1000).</summary>
    public bool DebiasedEstimationLoss { get; set; }
    /// <summary>Scale a v-prediction loss by SNR/(SNR+1) (SNR capped at 1000), like an ε loss.</summary>
    public bool ScaleVPredLossLikeNoisePred { get; set; }
    /// <summary>Add this × loss·(SNR+1)/SNR (a v-prediction-like term) to the loss.</summary>
    public double? VPredLikeLoss { get; set; }
    public double CaptionTagDropoutRate { get; set; }
    public bool EnableWildcard { get; set; }
    public string KeepTokensSeparator { get; set; } = "";
    public string CaptionSeparator { get; set; } = ",";
    public string SecondarySeparator { get; set; } = "";
    public string CaptionPrefix { get; set; } = "";
    public string CaptionSuffix { get; set; } = "";
    public int TokenWarmupMin { get; set; } = 1;
    public double TokenWarmupStep { get; set; }
    public int CaptionDropoutEveryNEpochs { get; set; }
    /// <summary>kohya cache_text_encoder_outputs: encode each caption once (UNet-only training with fixed captions).</summary>
    public bool CacheTextEncoderOutputs { get; set; }
    /// <summary>kohya random_crop: the bucket window is placed at random in the resized image each step (latents are not cached).</summary>
    public bool RandomCrop { get; set; }
    /// <summary>kohya flip_aug: each sample is mirrored left–right with probability ½ (both latents are cached).</summary>
    public bool FlipAug { get; set; }
    /// <summary>kohya vae: a standalone VAE whose weights replace the checkpoint's.</summary>
    public string? Vae { get; set; }
    /// <summary>Keep the VAE in float32 when the rest runs in bf16/fp16 (kohya no_half_vae).</summary>
    public bool NoHalfVae { get; set; }
    /// <summary>kohya options given that have no effect in LoraSharp, with the reason (the trainer logs them).</summary>
    public List<string> IgnoredOptions { get; } = [];
    /// <summary>kohya max_token_length: captions up to 150 or 225 tokens in 75-token chunks (null = 75).</summary>
    public int? MaxTokenLength { get; set; }
    /// <summary>kohya max-norm regularisation: cap ‖ΔW‖ of every LoRA module at this after each step.</summary>
    public double? ScaleWeightNorms { get; set; }
    /// <summary>l2 (default), l1, huber or smooth_l1 (kohya conditional_loss).</summary>
    public string LossType { get; set; } = "l2";
    /// <summary>snr (default), exponential or constant: how huber_c varies with the timestep.</summary>
    public string HuberSchedule { get; set; } = "snr";
    public double HuberC { get; set; } = 0.1;
    public double HuberScale { get; set; } = 1.0;

    // saving / sampling
    public int? SaveEveryNEpochs { get; set; }
    public int? SaveLastNEpochs { get; set; }
    public int? SaveEveryNSteps { get; set; }
    public int? SaveLastNSteps { get; set; }
    public int? SampleEveryNEpochs { get; set; }
    public string? SamplePrompts { get; set; }
    public string SampleSampler { get; set; } = "ddim";
    public string SaveModelAs { get; set; } = "safetensors";
    public string? SavePrecision { get; set; }
    public string? TrainingComment { get; set; }
    public bool SaveState { get; set; }
    /// <summary>A state folder written with <see cref="SaveState"/> (<c>&lt;output_name&gt;-state</c>) to continue from.</summary>
    public string? Resume { get; set; }

    /// <summary>Source of each option (file path or "command line"), for error messages.</summary>
    string _source = "config";

    sealed record Option(string Name, string Kind, Action<SdTrainConfig, object> Set, string Help);

    static readonly Option[] Options =
    [
        Str("pretrained_model_name_or_path", (c, v) => c.PretrainedModelNameOrPath = v, "diffusers folder or .safetensors/.ckpt file"),
        Str("tokenizer_path", (c, v) => c.TokenizerPath = v, "CLIP tokenizer folder"),
        Bool("v2", (c, v) => c.V2 = v, "SD 2.x model"),
        Bool("v_parameterization", (c, v) => c.VParameterization = v, "v-prediction loss"),
        Int("clip_skip", (c, v) => c.ClipSkip = v, "use hidden state [-n] of the text encoder"),
        Str("train_data_dir", (c, v) => c.TrainDataDir = v, "folder of <repeats>_<class tokens> subfolders"),
        Str("dataset_config", (c, v) => c.DatasetConfig = v, "kohya dataset TOML ([general], [[datasets]], [[datasets.subsets]]) instead of train_data_dir"),
        Str("reg_data_dir", (c, v) => c.RegDataDir = v, "regularisation folder"),
        Str("output_dir", (c, v) => c.OutputDir = v, "where adapters, samples and the loss curve go"),
        Str("output_name", (c, v) => c.OutputName = v, "file name of the adapter"),
        new("resolution", "string", (c, v) => c.Resolution = ParseResolution(Convert.ToString(v, CultureInfo.InvariantCulture)!), "W or W,H"),
        Bool("enable_bucket", (c, v) => c.EnableBucket = v, "aspect-ratio buckets"),
        Int("min_bucket_reso", (c, v) => c.MinBucketReso = v, "smallest bucket side"),
        Int("max_bucket_reso", (c, v) => c.MaxBucketReso = v, "largest bucket side"),
        Int("bucket_reso_steps", (c, v) => c.BucketResoSteps = v, "bucket side step"),
        Bool("bucket_no_upscale", (c, v) => c.BucketNoUpscale = v, "bucket = image size rounded down"),
        Str("caption_extension", (c, v) => c.CaptionExtension = v, "caption file extension"),
        Bool("shuffle_caption", (c, v) => c.ShuffleCaption = v, "shuffle comma-separated tags"),
        Int("keep_tokens", (c, v) => c.KeepTokens = v, "first N tags stay in place"),
        Dbl("caption_dropout_rate", (c, v) => c.CaptionDropoutRate = v, "probability of an empty caption"),
        Dbl("prior_loss_weight", (c, v) => c.PriorLossWeight = v, "loss weight of regularisation images"),
        Str("bad_images", (c, v) => c.BadImages = v, "skip | fail"),
        Str("network_module", (c, v) => c.NetworkModule = v, "lora | locon | loha | lokr | dylora | networks.lora | lycoris.kohya | networks.dylora"),
        new("network_args", "string list", (c, v) => c.NetworkArgs = ToList(v), "k=v items (conv_dim, conv_alpha, algo, rank_dropout, module_dropout, unit, …)"),
        Int("network_dim", (c, v) => c.NetworkDim = v, "rank"),
        Dbl("network_alpha", (c, v) => c.NetworkAlpha = v, "alpha"),
        Int("conv_dim", (c, v) => c.ConvDim = v, "rank of 3x3 convs (LoCon)"),
        Dbl("conv_alpha", (c, v) => c.ConvAlpha = v, "alpha of 3x3 convs"),
        Dbl("network_dropout", (c, v) => c.NetworkDropout = v, "dropout on the down output"),
        Dbl("rank_dropout", (c, v) => c.RankDropout = v, "rank dropout"),
        Dbl("module_dropout", (c, v) => c.ModuleDropout = v, "module dropout"),
        Str("network_weights", (c, v) => c.NetworkWeights = v, "initialise from an adapter file"),
        Bool("dim_from_weights", (c, v) => c.DimFromWeights = v, "take ranks from network_weights"),
        Bool("network_train_unet_only", (c, v) => c.NetworkTrainUnetOnly = v, "train the UNet adapter only"),
        Bool("network_train_text_encoder_only", (c, v) => c.NetworkTrainTextEncoderOnly = v, "train the text encoder adapter only"),
        Dbl("learning_rate", (c, v) => c.LearningRate = v, "base learning rate"),
        Dbl("unet_lr", (c, v) => c.UnetLr = v, "UNet adapter learning rate"),
        Dbl("text_encoder_lr", (c, v) => c.TextEncoderLr = v, "text encoder adapter learning rate"),
        Str("optimizer_type", (c, v) => c.OptimizerType = v, "AdamW | AdamW8bit | Lion | Prodigy | Adafactor"),
        new("optimizer_args", "string list", (c, v) => c.OptimizerArgs = ToList(v), "k=v items (weight_decay, betas, eps, d_coef, …)"),
        Str("lr_scheduler", (c, v) => c.LrScheduler = v, "constant | constant_with_warmup | cosine | cosine_with_restarts | linear | polynomial"),
        Dbl("lr_warmup_steps", (c, v) => c.LrWarmupSteps = v, "warm-up steps (or ratio < 1)"),
        Int("lr_scheduler_num_cycles", (c, v) => c.LrSchedulerNumCycles = v, "cosine_with_restarts cycles"),
        Dbl("lr_scheduler_power", (c, v) => c.LrSchedulerPower = v, "polynomial power"),
        Dbl("max_grad_norm", (c, v) => c.MaxGradNorm = v, "gradient clipping (0 = off)"),
        Int("max_train_epochs", (c, v) => c.MaxTrainEpochs = v, "epochs (overrides max_train_steps)"),
        Int("max_train_steps", (c, v) => c.MaxTrainSteps = v, "optimizer steps"),
        Int("train_batch_size", (c, v) => c.TrainBatchSize = v, "images per batch"),
        Int("gradient_accumulation_steps", (c, v) => c.GradientAccumulationSteps = v, "batches per optimizer step"),
        Bool("gradient_checkpointing", (c, v) => c.GradientCheckpointing = v, "recompute UNet blocks in backward"),
        Str("mixed_precision", (c, v) => c.MixedPrecision = v, "no | bf16 | fp16"),
        Bool("cache_latents", (c, v) => c.CacheLatents = v, "encode images once"),
        Bool("cache_latents_to_disk", (c, v) => c.CacheLatentsToDisk = v, "keep cached latents on disk"),
        Bool("auto_memory", (c, v) => c.AutoMemory = v, "choose memory savers to fit available memory"),
        Dbl("noise_offset", (c, v) => c.NoiseOffset = v, "noise offset"),
        Int("multires_noise_iterations", (c, v) => c.MultiresNoiseIterations = v, "pyramid noise levels"),
        Dbl("multires_noise_discount", (c, v) => c.MultiresNoiseDiscount = v, "pyramid noise discount"),
        Dbl("min_snr_gamma", (c, v) => c.MinSnrGamma = v, "min-SNR weighting gamma"),
        Int("min_timestep", (c, v) => c.MinTimestep = v, "smallest training timestep"),
        Int("max_timestep", (c, v) => c.MaxTimestep = v, "largest training timestep (exclusive)"),
        new("seed", "integer", (c, v) => c.Seed = Convert.ToInt64(v, CultureInfo.InvariantCulture), "random seed"),
        Dbl("ip_noise_gamma", (c, v) => c.IpNoiseGamma = v, "input perturbation noise strength (0.1 recommended)"),
        Bool("ip_noise_gamma_random_strength", (c, v) => c.IpNoiseGammaRandomStrength = v, "draw the perturbation strength from [0, ip_noise_gamma)"),
        Bool("zero_terminal_snr", (c, v) => c.ZeroTerminalSnr = v, "rescale betas to zero terminal SNR"),
        Int("max_token_length", (c, v) => c.MaxTokenLength = v, "caption tokens: 75 (default), 150 or 225"),
        Bool("flip_aug", (c, v) => c.FlipAug = v, "mirror each sample left-right with probability 1/2"),
        Bool("random_crop", (c, v) => c.RandomCrop = v, "crop the bucket window at a random place each step (no latent caching)"),
        Bool("cache_text_encoder_outputs", (c, v) => c.CacheTextEncoderOutputs = v, "encode each caption once (needs network_train_unet_only and fixed captions)"),
        Ignored("cache_text_encoder_outputs_to_disk", "boolean", "the text encoder outputs are cached in memory"),
        Bool("no_half_vae", (c, v) => c.NoHalfVae = v, "keep the VAE in float32 under bf16/fp16 mixed precision"),
        // kohya / Kohya_ss GUI options without an effect here: accepted (so their configs load) and reported
        Ignored("xformers", "boolean", "LoraSharp always uses scaled-dot-product attention"),
        Ignored("sdpa", "boolean", "LoraSharp always uses scaled-dot-product attention"),
        Ignored("mem_eff_attn", "boolean", "LoraSharp always uses scaled-dot-product attention"),
        Ignored("max_data_loader_n_workers", "integer", "images are loaded (and latents cached) on the training thread"),
        Ignored("persistent_data_loader_workers", "boolean", "images are loaded (and latents cached) on the training thread"),
        Ignored("logging_dir", "string", "the loss curve PNG is written to output_dir"),
        Ignored("log_prefix", "string", "the loss curve PNG is written to output_dir"),
        Ignored("log_with", "string", "the loss curve PNG is written to output_dir"),
        Ignored("log_tracker_name", "string", "the loss curve PNG is written to output_dir"),
        Ignored("wandb_run_name", "string", "the loss curve PNG is written to output_dir"),
        Ignored("lowram", "boolean", "memory is planned by auto_memory"),
        Ignored("highvram", "boolean", "memory is planned by auto_memory"),
        Ignored("full_fp16", "boolean", "adapter weights stay float32 under mixed precision"),
        Ignored("full_bf16", "boolean", "adapter weights stay float32 under mixed precision"),
        Ignored("epoch", "integer", "a Kohya_ss GUI field; max_train_epochs sets the epochs"),
        Ignored("save_state_on_train_end", "boolean", "save_state saves the state at the end"),
        Ignored("save_last_n_epochs_state", "integer", "one state folder is kept (the newest)"),
        Ignored("save_last_n_steps_state", "integer", "one state folder is kept (the newest)"),
        Ignored("dynamo_backend", "string", "no compiler backend", v => v is "no" or "NO" or "", "no"),
        Ignored("lr_scheduler_args", "string list", "no scheduler arguments", v => v is TomlArray { Count: 0 } || v is string { Length: 0 }, "[]"),
        Ignored("noise_offset_type", "string", "noise_offset / multires_noise_iterations choose the noise", v => v is "Original" or "Multires", "Original or Multires"),
        Ignored("fp8_base", "boolean", "no fp8 base", v => v is false || v is "false" or "False", "false"),
        Str("vae", (c, v) => c.Vae = v.Length == 0 ? null : v, "standalone VAE file or diffusers vae folder replacing the checkpoint's"),
        Dbl("scale_weight_norms", (c, v) => c.ScaleWeightNorms = v, "cap each LoRA module's ‖ΔW‖ at this after every step (1.0 is common)"),
        Bool("noise_offset_random_strength", (c, v) => c.NoiseOffsetRandomStrength = v, "scale noise_offset by U(0, 1) per step"),
        Dbl("adaptive_noise_scale", (c, v) => c.AdaptiveNoiseScale = v, "add this × |latent mean| to noise_offset"),
        Bool("debiased_estimation_loss", (c, v) => c.DebiasedEstimationLoss = v, "weight the loss by 1/√SNR"),
        Bool("scale_v_pred_loss_like_noise_pred", (c, v) => c.ScaleVPredLossLikeNoisePred = v, "scale a v-prediction loss by SNR/(SNR+1)"),
        Dbl("v_pred_like_loss", (c, v) => c.VPredLikeLoss = v, "add a v-prediction-like loss term of this weight"),
        Dbl("caption_tag_dropout_rate", (c, v) => c.CaptionTagDropoutRate = v, "drop each tag (after keep_tokens) with this probability"),
        Int("caption_dropout_every_n_epochs", (c, v) => c.CaptionDropoutEveryNEpochs = v, "empty captions in every N-th epoch"),
        Bool("enable_wildcard", (c, v) => c.EnableWildcard = v, "a random line of multi-line captions and a random {a|b} choice per step"),
        Str("keep_tokens_separator", (c, v) => c.KeepTokensSeparator = v, "tags before it stay first (and after a second one stay last) when shuffling"),
        Str("caption_separator", (c, v) => c.CaptionSeparator = v.Length == 0 ? "," : v, "what splits tags (default ,)"),
        Str("secondary_separator", (c, v) => c.SecondarySeparator = v, "joins tags that move together; becomes the separator after shuffling"),
        Str("caption_prefix", (c, v) => c.CaptionPrefix = v, "text put before every caption"),
        Str("caption_suffix", (c, v) => c.CaptionSuffix = v, "text put after every caption"),
        Int("token_warmup_min", (c, v) => c.TokenWarmupMin = v, "tags shown at the start of token warm-up"),
        Dbl("token_warmup_step", (c, v) => c.TokenWarmupStep = v, "steps (or fraction of the run, < 1) over which all tags appear"),
        Str("loss_type", (c, v) => c.LossType = v, "l2 | l1 | huber | smooth_l1"),
        Str("huber_schedule", (c, v) => c.HuberSchedule = v, "snr | exponential | constant"),
        Dbl("huber_c", (c, v) => c.HuberC = v, "Huber threshold (or its decay base for exponential)"),
        Dbl("huber_scale", (c, v) => c.HuberScale = v, "Huber threshold scale (exponential, constant)"),
        Int("save_every_n_epochs", (c, v) => c.SaveEveryNEpochs = v, "save an adapter every N epochs"),
        Int("save_last_n_epochs", (c, v) => c.SaveLastNEpochs = v, "keep only the last N saved epochs"),
        Int("save_every_n_steps", (c, v) => c.SaveEveryNSteps = v, "save an adapter every N steps (<output_name>-step00000100)"),
        Int("save_last_n_steps", (c, v) => c.SaveLastNSteps = v, "keep only the step saves of the last N steps"),
        Int("sample_every_n_epochs", (c, v) => c.SampleEveryNEpochs = v, "sample images every N epochs"),
        Str("sample_prompts", (c, v) => c.SamplePrompts = v, "prompt file (--n --w --h --s --l --d)"),
        Str("sample_sampler", (c, v) => c.SampleSampler = v, "ddim | euler | euler_a | dpmpp_2m | dpmpp_2m_karras"),
        Str("save_model_as", (c, v) => c.SaveModelAs = v, "safetensors | ckpt | pt"),
        Str("save_precision", (c, v) => c.SavePrecision = v, "float | fp16 | bf16"),
        Str("training_comment", (c, v) => c.TrainingComment = v, "ss_training_comment"),
        Bool("save_state", (c, v) => c.SaveState = v, "save adapter + optimizer + step + RNG to resume"),
        Str("resume", (c, v) => c.Resume = v, "state folder to resume from"),
    ];

    /// <summary>Every option name accepted (kohya's spelling).</summary>
    public static IReadOnlyList<string> OptionNames { get; } = Options.Select(o => o.Name).ToArray();

    /// <summary>One line per option: name, kind and meaning.</summary>
    public static IEnumerable<(string Name, string Kind, string Help)> Describe() => Options.Select(o => (o.Name, o.Kind, o.Help));

    /// <summary>An accepted kohya option without an effect; <paramref name="accepts"/> lists the values that are harmless (others are errors).</summary>
    static Option Ignored(string n, string kind, string reason, Func<object, bool>? accepts = null, string? acceptable = null) =>
        new(n, kind, (c, v) =>
        {
            if (accepts is not null && !accepts(v))
                throw new FormatException($"only {acceptable} is supported ({reason})");
            c.IgnoredOptions.Add($"{n} ({reason})");
        }, "accepted for kohya compatibility, no effect: " + reason);

    static Option Str(string n, Action<SdTrainConfig, string> set, string help) =>
        new(n, "string", (c, v) => set(c, v as string ?? Convert.ToString(v, CultureInfo.InvariantCulture)!), help);
    static Option Int(string n, Action<SdTrainConfig, int> set, string help) =>
        new(n, "integer", (c, v) => set(c, Convert.ToInt32(v is string s ? long.Parse(s, CultureInfo.InvariantCulture) : v, CultureInfo.InvariantCulture)), help);
    static Option Dbl(string n, Action<SdTrainConfig, double> set, string help) =>
        new(n, "number", (c, v) => set(c, Convert.ToDouble(v, CultureInfo.InvariantCulture)), help);
    static Option Bool(string n, Action<SdTrainConfig, bool> set, string help) =>
        new(n, "boolean", (c, v) => set(c, v is string s ? ParseBool(s) : (bool)v), help);

    static bool ParseBool(string s) => s.ToLowerInvariant() switch
    {
        "true" or "1" or "yes" or "on" => true,
        "false" or "0" or "no" or "off" => false,
        _ => throw new FormatException($"'{s}' is not a boolean (true/false)"),
    };

    static List<string> ToList(object v) => v switch
    {
        string s => s.Split(' ', StringSplitOptions.RemoveEmptyEntries).ToList(),
        TomlArray a => a.Select(x => Convert.ToString(x, CultureInfo.InvariantCulture)!).ToList(),
        IEnumerable<object> e => e.Select(x => Convert.ToString(x, CultureInfo.InvariantCulture)!).ToList(),
        _ => throw new FormatException("expected a string or an array of strings"),
    };

    static (int, int) ParseResolution(string v)
    {
        var parts = v.Split([',', 'x'], StringSplitOptions.TrimEntries | StringSplitOptions.RemoveEmptyEntries);
        if (parts.Length is < 1 or > 2 || !parts.All(p => int.TryParse(p, NumberStyles.None, CultureInfo.InvariantCulture, out _)))
            throw new FormatException($"'{v}' is not a resolution (expected W or W,H)");
        int w = int.Parse(parts[0], CultureInfo.InvariantCulture);
        return (w, parts.Length == 2 ? int.Parse(parts[1], CultureInfo.InvariantCulture) : w);
    }

    /// <summary>A shallow copy (list-valued options are shared).</summary>
    public SdTrainConfig Clone() => (SdTrainConfig)MemberwiseClone();

    /// <summary>Sets one option by its kohya name (a hyphenated spelling is accepted).</summary>
    public void Set(string key, object value, string? source = null)
    {
        var name = key.Replace('-', '_');
        var opt = Options.FirstOrDefault(o => o.Name == name)
            ?? throw new LoraSharpException($"unknown option '{key}'{DidYouMean(name)}. Valid options: {string.Join(", ", OptionNames)}", source ?? _source, key);
        if (value is long l && opt.Kind == "string") value = l.ToString(CultureInfo.InvariantCulture);
        try { opt.Set(this, value); }
        catch (Exception e) when (e is FormatException or InvalidCastException or OverflowException)
        {
            throw new LoraSharpException($"expected {opt.Kind} ({opt.Help}), got '{value}': {e.Message}", source ?? _source, key, e);
        }
    }

    /// <summary>Reads a TOML config file.</summary>
    public static SdTrainConfig FromToml(string path)
    {
        if (!File.Exists(path)) throw new LoraSharpException("config file not found", path);
        return FromTomlText(File.ReadAllText(path), path);
    }

    /// <summary>Reads TOML text; keys inside tables are read as top-level keys.</summary>
    public static SdTrainConfig FromTomlText(string text, string source = "config")
    {
        TomlTable table;
        try { table = TomlSerializer.Deserialize<TomlTable>(text)!; }
        catch (TomlException e) { throw new LoraSharpException($"not valid TOML: {e.Message}", source, inner: e); }
        var c = new SdTrainConfig { _source = source };
        void Walk(TomlTable t)
        {
            foreach (var (k, v) in t)
            {
                if (v is TomlTable sub) Walk(sub);
                else c.Set(k, v, source);
            }
        }
        Walk(table);
        return c;
    }

    /// <summary>
    /// Applies command-line flags <c>--name value</c> (also <c>--name=value</c>); a boolean flag without a value
    /// means true. Returns the arguments that are not flags (positional).
    /// </summary>
    public List<string> ApplyArgs(IReadOnlyList<string> args)
    {
        var positional = new List<string>();
        for (int i = 0; i < args.Count; i++)
        {
            var a = args[i];
            if (!a.StartsWith("--", StringComparison.Ordinal)) { positional.Add(a); continue; }
            var body = a[2..];
            string? value = null;
            int eq = body.IndexOf('=');
            if (eq >= 0) { value = body[(eq + 1)..]; body = body[..eq]; }
            var name = body.Replace('-', '_');
            var opt = Options.FirstOrDefault(o => o.Name == name)
                ?? throw new LoraSharpException($"unknown option '--{body}'{DidYouMean(name)}. Valid options: {string.Join(", ", OptionNames)}", "command line", body);
            if (value is null)
            {
                bool nextIsValue = i + 1 < args.Count && !args[i + 1].StartsWith("--", StringComparison.Ordinal);
                if (opt.Kind == "boolean" && !(nextIsValue && IsBoolWord(args[i + 1]))) value = "true";
                else if (opt.Kind == "string list")
                {
                    var items = new List<string>();
                    while (i + 1 < args.Count && !args[i + 1].StartsWith("--", StringComparison.Ordinal)) items.Add(args[++i]);
                    value = string.Join(' ', items);
                }
                else if (nextIsValue) value = args[++i];
                else throw new LoraSharpException($"option --{body} needs a value ({opt.Kind})", "command line", body);
            }
            Set(name, value, "command line");
        }
        return positional;
    }

    /// <summary>" (did you mean 'x'?)" for the closest option name within edit distance 3, else "".</summary>
    static string DidYouMean(string name)
    {
        var best = OptionNames.Select(o => (o, EditDistance.Levenshtein(o, name))).MinBy(x => x.Item2);
        return best.Item2 <= 3 ? $" (did you mean '{best.o}'?)" : "";
    }

    static bool IsBoolWord(string s) => s.ToLowerInvariant() is "true" or "false" or "1" or "0" or "yes" or "no" or "on" or "off";

    /// <summary>network_args as a dictionary (k=v; a bare k is "true").</summary>
    public Dictionary<string, string> NetworkArgDictionary()
    {
        var d = new Dictionary<string, string>(StringComparer.Ordinal);
        foreach (var item in NetworkArgs)
        {
            int eq = item.IndexOf('=');
            if (eq < 0) d[item.Trim()] = "true";
            else d[item[..eq].Trim()] = item[(eq + 1)..].Trim();
        }
        return d;
    }

    /// <summary>Checks required options and ranges; throws naming the option.</summary>
    public void Validate()
    {
        void Need(bool ok, string key, string what) { if (!ok) throw new LoraSharpException(what, _source, key); }
        Need(PretrainedModelNameOrPath.Length > 0, "pretrained_model_name_or_path", "is required");
        Need(TrainDataDir.Length > 0 || DatasetConfig is { Length: > 0 }, "train_data_dir", "is required (or dataset_config)");
        Need(!(TrainDataDir.Length > 0 && DatasetConfig is { Length: > 0 }), "dataset_config", "give either train_data_dir or dataset_config, not both (kohya ignores the folder then)");
        Need(OutputDir.Length > 0, "output_dir", "is required");
        Need(NetworkDim >= 1, "network_dim", "must be at least 1");
        Need(TrainBatchSize >= 1, "train_batch_size", "must be at least 1");
        Need(GradientAccumulationSteps >= 1, "gradient_accumulation_steps", "must be at least 1");
        Need(Resolution.W >= 8 && Resolution.H >= 8 && Resolution.W % 8 == 0 && Resolution.H % 8 == 0, "resolution", "sides must be multiples of 8");
        Need(BucketResoSteps >= 8 && BucketResoSteps % 8 == 0, "bucket_reso_steps", "must be a multiple of 8");
        Need(MinBucketReso <= MaxBucketReso, "min_bucket_reso", "must not exceed max_bucket_reso");
        Need(CaptionDropoutRate is >= 0 and <= 1, "caption_dropout_rate", "must be in [0, 1]");
        Need(MixedPrecision is "no" or "bf16" or "fp16" or "float", "mixed_precision", "expected no, bf16 or fp16");
        Need(SaveModelAs is "safetensors" or "ckpt" or "pt", "save_model_as", "expected safetensors, ckpt or pt");
        Need(SavePrecision is null or "float" or "fp16" or "bf16", "save_precision", "expected float, fp16 or bf16");
        Need(BadImages is "skip" or "fail", "bad_images", "expected skip or fail");
        Need(!(NetworkTrainUnetOnly && NetworkTrainTextEncoderOnly), "network_train_unet_only", "cannot be combined with network_train_text_encoder_only");
        Need(MinTimestep >= 0 && MaxTimestep > MinTimestep && MaxTimestep <= 1000, "max_timestep", "need 0 <= min_timestep < max_timestep <= 1000");
        Need(MaxTrainEpochs is null or >= 1, "max_train_epochs", "must be at least 1");
        Need(MaxTrainSteps >= 1, "max_train_steps", "must be at least 1");
        Need(Optim.LrSchedule.Names.Contains(LrScheduler), "lr_scheduler", "expected one of: " + string.Join(", ", Optim.LrSchedule.Names));
        Need(LrWarmupSteps >= 0, "lr_warmup_steps", "must not be negative");
        Need(IpNoiseGamma is null or >= 0, "ip_noise_gamma", "must not be negative");
        Need(ScaleWeightNorms is null or > 0, "scale_weight_norms", "must be positive");
        Need(MaxTokenLength is null or 75 or 150 or 225, "max_token_length", "expected 75, 150 or 225");
        Need(!(RandomCrop && (CacheLatents || CacheLatentsToDisk)), "random_crop", "crops differently every step, so latents cannot be cached: drop cache_latents");
        Need(!CacheTextEncoderOutputs || NetworkTrainUnetOnly || TextEncoderLr == 0, "cache_text_encoder_outputs",
            "caches the text encoder's outputs, so the text encoder cannot train: add network_train_unet_only");
        Need(!CacheTextEncoderOutputs || !(ShuffleCaption || CaptionDropoutRate > 0 || CaptionTagDropoutRate > 0 || CaptionDropoutEveryNEpochs > 0 || TokenWarmupStep > 0 || EnableWildcard),
            "cache_text_encoder_outputs", "needs fixed captions: not with shuffle_caption, caption_dropout_rate, caption_tag_dropout_rate, caption_dropout_every_n_epochs, token_warmup_step or enable_wildcard");
        Need(CaptionTagDropoutRate is >= 0 and <= 1, "caption_tag_dropout_rate", "must be in [0, 1]");
        Need(CaptionDropoutEveryNEpochs >= 0, "caption_dropout_every_n_epochs", "must not be negative");
        Need(TokenWarmupMin >= 0 && TokenWarmupStep >= 0, "token_warmup_step", "token_warmup_min and token_warmup_step must not be negative");
        Need(AdaptiveNoiseScale is null || NoiseOffset > 0, "adaptive_noise_scale", "needs noise_offset (kohya applies it to the noise offset)");
        Need(!(ZeroTerminalSnr && MaxTimestep == 1000 && (DebiasedEstimationLoss || VPredLikeLoss is not null)), DebiasedEstimationLoss ? "debiased_estimation_loss" : "v_pred_like_loss",
            "divides by the SNR, which is 0 at the last timestep of a zero_terminal_snr schedule: set max_timestep below 1000 or drop one of the two");
        Need(LossType is "l2" or "l1" or "huber" or "smooth_l1", "loss_type", "expected l2, l1, huber or smooth_l1");
        Need(HuberSchedule is "snr" or "exponential" or "constant", "huber_schedule", "expected snr, exponential or constant");
        Need(HuberC > 0 && HuberC <= 1 || HuberSchedule == "constant" && HuberC > 0, "huber_c", "must be in (0, 1] (it is a decay base for exponential and a floor for snr)");
        Need(HuberScale > 0, "huber_scale", "must be positive");
        Need(SaveEveryNSteps is null or >= 1, "save_every_n_steps", "must be at least 1");
        Need(SaveLastNSteps is null or >= 1, "save_last_n_steps", "must be at least 1");
        _ = Optim.OptimizerFactory.Normalize(OptimizerType);
        _ = NetworkSpec.From(this);
    }
}
