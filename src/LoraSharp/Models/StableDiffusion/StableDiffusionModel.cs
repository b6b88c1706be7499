using LoraSharp.IO;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Models.StableDiffusion;

/// <summary>Stable Diffusion model families LoraSharp recognises.</summary>
public enum StableDiffusionFamily
{
    Unknown,
    /// <summary>SD 1.x: CLIP ViT-L/14 (768), 4-level UNet with conv proj_in/out.</summary>
    SD1,
    /// <summary>SD 2.x: OpenCLIP ViT-H/14 (1024, penultimate layer), linear proj_in/out, head dim 64.</summary>
    SD2,
    /// <summary>SDXL base: CLIP ViT-L + OpenCLIP bigG (with projection), 3-level UNet, text_time added conditioning.</summary>
    SDXLBase,
    /// <summary>SDXL refiner: OpenCLIP bigG only, 4-level UNet, text_time conditioning with 5 numbers (aesthetic score).</summary>
    SDXLRefiner,
}

/// <summary>The configs of all components. Null text encoders / VAE are absent from the model.</summary>
public sealed record StableDiffusionConfig
{
    public StableDiffusionFamily Family { get; init; }
    public required UNetConfig Unet { get; init; }
    public VaeConfig? Vae { get; init; }
    /// <summary><c>text_encoder</c>: CLIP-L (SD1, SDXL base) or OpenCLIP-H (SD2).</summary>
    public ClipTextConfig? TextEncoder { get; init; }
    /// <summary><c>text_encoder_2</c>: OpenCLIP-bigG with projection (SDXL base and refiner).</summary>
    public ClipTextConfig? TextEncoder2 { get; init; }

    /// <summary>Reads <c>unet/</c>, <c>vae/</c>, <c>text_encoder/</c>, <c>text_encoder_2/</c> config.json files of a diffusers folder (those present).</summary>
    public static StableDiffusionConfig FromDiffusersFolder(string folder)
    {
        string Cfg(string sub) => Path.Combine(folder, sub, "config.json");
        if (!File.Exists(Cfg("unet")))
            throw new LoraSharpException("not a diffusers Stable Diffusion folder: unet/config.json is missing", folder);
        var unet = UNetConfig.FromJsonFile(Cfg("unet"));
        var vae = File.Exists(Cfg("vae")) ? VaeConfig.FromJsonFile(Cfg("vae")) : null;
        var te = File.Exists(Cfg("text_encoder")) ? ClipTextConfig.FromJsonFile(Cfg("text_encoder")) : null;
        var te2 = File.Exists(Cfg("text_encoder_2")) ? ClipTextConfig.FromJsonFile(Cfg("text_encoder_2")) : null;
        return new StableDiffusionConfig { Family = FamilyOf(unet, te, te2), Unet = unet, Vae = vae, TextEncoder = te, TextEncoder2 = te2 };
    }

    /// <summary>The family a set of configs describes: text_time conditioning = SDXL (refiner without text_encoder),
    /// linear projection with a gelu encoder = SD2, else SD1.</summary>
    public static StableDiffusionFamily FamilyOf(UNetConfig unet, ClipTextConfig? te, ClipTextConfig? te2)
    {
        if (unet.AdditionEmbedType == "text_time")
            return te is null && te2 is not null ? StableDiffusionFamily.SDXLRefiner : StableDiffusionFamily.SDXLBase;
        if (te2 is not null) return StableDiffusionFamily.Unknown;
        if (unet.UseLinearProjection || te?.HiddenAct == "gelu") return StableDiffusionFamily.SD2;
        return StableDiffusionFamily.SD1;
    }
}

/// <summary>What the UNet is conditioned on: the cross-attention states [B, T, context] and, for SDXL, the pooled
/// projected text embeds [B, P] (null otherwise).</summary>
public sealed record TextConditioning(Tensor Context, Tensor? PooledTextEmbeds) : IDisposable
{
    public void Dispose()
    {
        Context.Dispose();
        PooledTextEmbeds?.Dispose();
    }
}

/// <summary>Options for loading a Stable Diffusion model.</summary>
public sealed record StableDiffusionLoadOptions
{
    /// <summary>Parameter dtype (Float32, Float16 or BFloat16); stored tensors are converted.</summary>
    public ScalarType DType { get; init; } = ScalarType.Float32;
    /// <summary>Device for the parameters; null = CPU.</summary>
    public Device? Device { get; init; }
    /// <summary>Single files: use these configs instead of the ones derived from the file's shapes.</summary>
    public StableDiffusionConfig? Config { get; init; }
    /// <summary>Single files: load the UNet from the EMA copy (<c>model_ema.*</c>) instead of <c>model.diffusion_model.*</c>.</summary>
    public bool UseEma { get; init; }
    public bool LoadVae { get; init; } = true;
    public bool LoadTextEncoders { get; init; } = true;
    /// <summary>Throw when the file holds keys no parameter read (they are always listed in the reports).</summary>
    public bool ThrowOnUnexpected { get; init; }
    /// <summary>The VAE's dtype when it should differ from <see cref="DType"/> (SDXL's VAE overflows in float16:
    /// diffusers' force_upcast); null = <see cref="DType"/>.</summary>
    public ScalarType? VaeDType { get; init; }
}

/// <summary>
/// A whole Stable Diffusion model: submodules <c>unet</c>, <c>vae</c>, <c>text_encoder</c>, <c>text_encoder_2</c>, so
/// <c>named_modules()</c> paths are e.g. <c>unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q</c> and
/// <c>text_encoder.text_model.encoder.layers.0.self_attn.q_proj</c> (diffusers names inside each component).
/// </summary>
public sealed class StableDiffusionModel : nn.Module
{
    /// <summary>Children are registered explicitly under checkpoint names; TorchSharp's field-based registration would add them again under the C# field names.</summary>
    protected override void RegisterComponents() { }

    public StableDiffusionConfig Config { get; }
    public StableDiffusionFamily Family => Config.Family;
    public UNet2DConditionModel Unet { get; }
    public AutoencoderKL? Vae { get; }
    public ClipTextModel? TextEncoder { get; }
    public ClipTextModel? TextEncoder2 { get; }
    /// <summary>One report per loaded component (empty for a model built with random weights).</summary>
    public IReadOnlyList<WeightLoadReport> LoadReports { get; internal set; } = [];

    /// <summary>Builds the components of <paramref name="config"/> with freshly initialised weights
    /// (<paramref name="vaeDtype"/>: the VAE's own dtype, e.g. float32 for SDXL's fp16-NaN-prone VAE).</summary>
    public StableDiffusionModel(StableDiffusionConfig config, Device? device = null, ScalarType? dtype = null,
        bool withVae = true, bool withTextEncoders = true, ScalarType? vaeDtype = null) : base(nameof(StableDiffusionModel))
    {
        Config = config;
        Unet = new UNet2DConditionModel(config.Unet, device, dtype);
        register_module("unet", Unet);
        if (withTextEncoders && config.TextEncoder is not null)
        {
            TextEncoder = new ClipTextModel(config.TextEncoder, device, dtype);
            register_module("text_encoder", TextEncoder);
        }
        if (withTextEncoders && config.TextEncoder2 is not null)
        {
            TextEncoder2 = new ClipTextModel(config.TextEncoder2, device, dtype);
            register_module("text_encoder_2", TextEncoder2);
        }
        if (withVae && config.Vae is not null)
        {
            Vae = new AutoencoderKL(config.Vae, device, vaeDtype ?? dtype);
            register_module("vae", Vae);
        }
    }

    /// <summary>Loads a diffusers folder or a single-file checkpoint (.safetensors / .ckpt), whichever <paramref name="path"/> is.</summary>
    /// <summary>
    /// Replaces the VAE's weights by those of a standalone VAE file (A1111's "SD VAE", kohya's <c>vae</c>): a
    /// <c>.vae.safetensors</c> / <c>.vae.pt</c> in ldm names (with or without <c>first_stage_model.</c>), a single-file
    /// checkpoint's VAE, or a diffusers <c>vae/</c> folder. Its architecture must be this model's VAE (shapes are
    /// checked); the weights take the VAE's dtype and device. The scaling factor stays the model's.
    /// </summary>
    public void ReplaceVaeWeights(string path)
    {
        var vae = Vae ?? throw new LoraSharpException("the model has no VAE to replace", path, "vae");
        var first = vae.parameters().First();
        using var loaded = StableDiffusionCheckpoint.LoadVae(path, Directory.Exists(path) ? null : Config.Vae, first.dtype, first.device);
        using var noGrad = no_grad();
        var source = loaded.state_dict();
        foreach (var (key, target) in vae.state_dict())
        {
            if (!source.TryGetValue(key, out var value) || !value.shape.SequenceEqual(target.shape))
                throw new LoraSharpException($"the VAE file does not fit the model's VAE at {key} ([{string.Join(", ", value?.shape ?? [])}] vs [{string.Join(", ", target.shape)}])", path, "vae");
            target.copy_(value);
        }
    }

    public static StableDiffusionModel Load(string path, StableDiffusionLoadOptions? options = null) =>
        Directory.Exists(path) ? FromDiffusers(path, options) : StableDiffusionCheckpoint.Load(path, options);

    /// <summary>
    /// Loads a diffusers folder: each component's config.json and weights (<c>diffusion_pytorch_model.safetensors</c> or
    /// <c>model.safetensors</c>, sharded with an <c>.index.json</c>, their <c>.fp16</c> variants, or <c>.bin</c>), with a
    /// name-checked copy.
    /// </summary>
    public static StableDiffusionModel FromDiffusers(string folder, StableDiffusionLoadOptions? options = null)
    {
        options ??= new StableDiffusionLoadOptions();
        var config = StableDiffusionConfig.FromDiffusersFolder(folder);
        // Built on the meta device (no memory, no random initialisation); loading puts every parameter on options.Device.
        var model = new StableDiffusionModel(config, MetaDevice, options.DType, options.LoadVae, options.LoadTextEncoders, options.VaeDType);
        try
        {
            var reports = new List<WeightLoadReport>();
            void LoadComponent(nn.Module? module, string name)
            {
                if (module is null) return;
                var file = WeightsFile(Path.Combine(folder, name));
                using var source = OpenTensors(file);
                var consumed = new HashSet<string>();
                var report = WeightCopy.Copy(module, name, source, WeightCopy.Identity(module), consumed, materializeOn: options.Device);
                reports.Add(WithUnexpected(report, source.Keys.Where(k => !consumed.Contains(k)), options.ThrowOnUnexpected));
            }
            LoadComponent(model.Unet, "unet");
            LoadComponent(model.TextEncoder, "text_encoder");
            LoadComponent(model.TextEncoder2, "text_encoder_2");
            LoadComponent(model.Vae, "vae");
            model.LoadReports = reports;
            return model;
        }
        catch
        {
            model.Dispose();
            throw;
        }
    }

    /// <summary>
    /// Writes the model as a diffusers folder: <c>model_index.json</c>, and per component its <c>config.json</c> and
    /// weights (<c>unet/diffusion_pytorch_model.safetensors</c>, <c>vae/…</c>, <c>text_encoder/model.safetensors</c>,
    /// <c>text_encoder_2/…</c>) in <paramref name="dtype"/> (default: each parameter's dtype). Tokenizers and the scheduler
    /// are not part of the model and are not written.
    /// </summary>
    public void SaveDiffusers(string folder, ScalarType? dtype = null)
    {
        Directory.CreateDirectory(folder);
        var index = new Dictionary<string, object?>
        {
            ["_class_name"] = Family switch
            {
                StableDiffusionFamily.SDXLBase => "StableDiffusionXLPipeline",
                StableDiffusionFamily.SDXLRefiner => "StableDiffusionXLImg2ImgPipeline",
                _ => "StableDiffusionPipeline",
            },
            ["_diffusers_version"] = DiffusersJson.DiffusersVersion,
        };
        void Component(nn.Module? module, string name, string library, string className, string config, string weightsName)
        {
            if (module is null) return;
            var dir = Directory.CreateDirectory(Path.Combine(folder, name)).FullName;
            File.WriteAllText(Path.Combine(dir, "config.json"), config);
            var tensors = module.named_parameters().Select(p => new PendingTensor(p.name, dtype ?? p.parameter.dtype, p.parameter.shape, () =>
            {
                using var noGrad = no_grad();
                return p.parameter.to_type(dtype ?? p.parameter.dtype).contiguous();
            })).ToList();
            SafetensorsWriter.Write(Path.Combine(dir, weightsName), tensors);
            index[name] = new[] { library, className };
        }
        Component(TextEncoder, "text_encoder", "transformers", "CLIPTextModel", TextEncoder?.Config.ToJson() ?? "", "model.safetensors");
        Component(TextEncoder2, "text_encoder_2", "transformers", "CLIPTextModelWithProjection", TextEncoder2?.Config.ToJson() ?? "", "model.safetensors");
        Component(Unet, "unet", "diffusers", "UNet2DConditionModel", Unet.Config.ToJson(), "diffusion_pytorch_model.safetensors");
        Component(Vae, "vae", "diffusers", "AutoencoderKL", Vae?.Config.ToJson() ?? "", "diffusion_pytorch_model.safetensors");
        File.WriteAllText(Path.Combine(folder, "model_index.json"), DiffusersJson.Write(index));
    }

    /// <summary>The weights file of a diffusers component folder.</summary>
    internal static string WeightsFile(string componentFolder)
    {
        string[] names = ["diffusion_pytorch_model.safetensors", "model.safetensors",
            "diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json",
            "diffusion_pytorch_model.fp16.safetensors", "model.fp16.safetensors",
            "diffusion_pytorch_model.safetensors.index.fp16.json", "model.safetensors.index.fp16.json",
            "diffusion_pytorch_model.bin", "pytorch_model.bin", "diffusion_pytorch_model.bin.index.json", "pytorch_model.bin.index.json"];
        foreach (var n in names)
        {
            var p = Path.Combine(componentFolder, n);
            if (File.Exists(p)) return p;
        }
        throw new LoraSharpException($"no weights file found (looked for {string.Join(", ", names)})", componentFolder);
    }

    /// <summary>Opens a tensor file by its content (safetensors or PyTorch zip), or a sharded checkpoint's <c>*.index*.json</c>; a torch.save'd <c>{"state_dict": …}</c>
    /// is seen without its <c>state_dict.</c> prefix.</summary>
    internal static ITensorSource OpenTensors(string path)
    {
        if (path.EndsWith(".json", StringComparison.OrdinalIgnoreCase))
            return ShardedTensorSource.Open(path);
        var source = TensorFiles.Open(path);
        return StateDictView.Unwrap(source);
    }

    /// <summary>Splits leftover file keys into ignored (known non-parameters) and unexpected.</summary>
    internal static WeightLoadReport WithUnexpected(WeightLoadReport report, IEnumerable<string> leftover, bool throwOnUnexpected, Func<string, bool>? ignore = null)
    {
        var ignored = new List<string>();
        var unexpected = new List<string>();
        foreach (var k in leftover)
            (IsIgnorable(k) || (ignore?.Invoke(k) ?? false) ? ignored : unexpected).Add(k);
        if (throwOnUnexpected && unexpected.Count > 0)
            throw new LoraSharpException($"{report.Component}: {unexpected.Count} keys match no parameter: {string.Join(", ", unexpected.Take(20))}", report.FilePath);
        return new WeightLoadReport
        {
            Component = report.Component, FilePath = report.FilePath, Loaded = report.Loaded,
            Missing = report.Missing, ShapeMismatches = report.ShapeMismatches, Unexpected = unexpected, Ignored = ignored,
        };
    }

    /// <summary>Keys that are not parameters of the inference model: CLIP position_ids buffers, OpenCLIP logit_scale and
    /// attn_mask, ldm noise-schedule buffers, EMA bookkeeping.</summary>
    public static bool IsIgnorable(string key)
    {
        if (key.EndsWith("embeddings.position_ids", StringComparison.Ordinal)) return true;
        if (key.EndsWith(".logit_scale", StringComparison.Ordinal) || key == "logit_scale") return true;
        if (key.EndsWith(".attn_mask", StringComparison.Ordinal)) return true;
        if (key.StartsWith("model_ema.", StringComparison.Ordinal)) return true;
        return LdmScheduleBuffers.Contains(key);
    }

    static readonly HashSet<string> LdmScheduleBuffers =
    [
        "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
        "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2", "logvar", "lvlb_weights",
    ];

    internal static readonly Device MetaDevice = new(DeviceType.META);

    /// <summary>
    /// The UNet's text conditioning for token ids, by the family's convention. <paramref name="clipSkip"/> 1 = the
    /// family's default layer, 2 = one layer earlier, ….
    /// SD1/SD2: hidden state [−clipSkip] through the final layer norm (clip skip 1 = last_hidden_state; SD2's encoder
    /// already omits OpenCLIP's last layer). SDXL base: cat(encoder 1, encoder 2) of hidden state [−(clipSkip+1)]
    /// without the final norm (penultimate by default), with <paramref name="inputIds2"/> for encoder 2 (its tokenizer
    /// pads with id 0; defaults to <paramref name="inputIds"/>); refiner: encoder 2 alone. SDXL also returns the pooled,
    /// projected output of encoder 2 (last layer, final norm, EOS = argmax id) for <see cref="UNetInputs.TextEmbeds"/>.
    /// </summary>
    public TextConditioning EncodeText(Tensor inputIds, Tensor? inputIds2 = null, int clipSkip = 1)
    {
        if (clipSkip < 1) throw new ArgumentOutOfRangeException(nameof(clipSkip), clipSkip, "clip skip starts at 1");
        using var scope = NewDisposeScope();
        switch (Family)
        {
            case StableDiffusionFamily.SDXLBase:
            case StableDiffusionFamily.SDXLRefiner:
            {
                var te2 = TextEncoder2 ?? throw new InvalidOperationException("this SDXL model was loaded without text_encoder_2");
                using var o2 = te2.call(inputIds2 ?? inputIds);
                var states2 = Pick(o2.HiddenStates, clipSkip + 1);
                Tensor context;
                if (Family == StableDiffusionFamily.SDXLBase)
                {
                    var te1 = TextEncoder ?? throw new InvalidOperationException("this SDXL model was loaded without text_encoder");
                    using var o1 = te1.call(inputIds);
                    context = cat([Pick(o1.HiddenStates, clipSkip + 1), states2], -1);
                }
                else
                {
                    context = states2.alias();
                }
                var pooled = o2.TextEmbeds!.alias();
                return new TextConditioning(context.MoveToOuterDisposeScope(), pooled.MoveToOuterDisposeScope());
            }
            default:
            {
                var te = TextEncoder ?? throw new InvalidOperationException("this model was loaded without its text encoder");
                return new TextConditioning(te.Encode(inputIds, clipSkip, applyFinalLayerNorm: true).MoveToOuterDisposeScope(), null);
            }
        }
    }

    static Tensor Pick(IReadOnlyList<Tensor> hiddenStates, int fromEnd) =>
        fromEnd <= hiddenStates.Count - 1
            ? hiddenStates[hiddenStates.Count - fromEnd]
            : throw new ArgumentOutOfRangeException(nameof(fromEnd), $"clip skip reaches past the first layer ({hiddenStates.Count - 1} layers)");

    /// <summary>
    /// SDXL's added time ids per sample: base [orig_h, orig_w, crop_top, crop_left, target_h, target_w]; refiner
    /// [orig_h, orig_w, crop_top, crop_left, aesthetic_score] (pixels; score e.g. 6 for the positive, 2.5 for the negative prompt).
    /// </summary>
    public Tensor TimeIds(int batch, (int Height, int Width) original, (int Top, int Left) crop, (int Height, int Width) target, double aestheticScore = 6.0)
    {
        float[] row = Family == StableDiffusionFamily.SDXLRefiner
            ? [original.Height, original.Width, crop.Top, crop.Left, (float)aestheticScore]
            : [original.Height, original.Width, crop.Top, crop.Left, target.Height, target.Width];
        var device = Unet.parameters().First().device;
        using var scope = NewDisposeScope();
        return tensor(row, device: device).unsqueeze(0).expand(batch, row.Length).contiguous().MoveToOuterDisposeScope();
    }

    /// <summary>Number of parameters of a module.</summary>
    public static long ParameterCount(nn.Module module) => module.parameters().Sum(p => p.numel());
}
