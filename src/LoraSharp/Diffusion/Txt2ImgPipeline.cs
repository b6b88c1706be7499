using System.Diagnostics;
using System.Text.RegularExpressions;
using LoraSharp.Adapters;
using LoraSharp.Formats;
using LoraSharp.Imaging;
using LoraSharp.Models.StableDiffusion;
using LoraSharp.Text;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Diffusion;

/// <summary>Options of <see cref="Txt2ImgPipeline.Load"/>.</summary>
public sealed record Txt2ImgLoadOptions
{
    public ScalarType DType { get; init; } = ScalarType.Float32;
    public Device? Device { get; init; }
    /// <summary>Tokenizer folder (vocab.json + merges.txt, or bpe_simple_vocab_16e6.txt(.gz)); default: the model folder's <c>tokenizer/</c>, or a <c>tokenizer/</c> folder next to a single file.</summary>
    public string? TokenizerFolder { get; init; }
    /// <summary>A diffusers folder whose config.json files (and scheduler config) describe a single-file checkpoint.</summary>
    public string? ConfigFolder { get; init; }
    /// <summary>The LoRA folder (A1111 <c>models/Lora</c>); null = LoRA tags are refused.</summary>
    public string? LoraFolder { get; init; }
    /// <summary>A standalone VAE (A1111's "SD VAE"): its weights replace the checkpoint's (<see cref="StableDiffusionModel.ReplaceVaeWeights"/>).</summary>
    public string? VaePath { get; init; }
    /// <summary>Compute A1111's model hash (SHA-256 of the checkpoint file) for the image parameters.</summary>
    public bool ComputeModelHash { get; init; } = true;
}

/// <summary>
/// Text to image the AUTOMATIC1111 way, on a <see cref="StableDiffusionModel"/> (SD1.x, SD2.x, SDXL):
/// <list type="number">
/// <item>the prompt is parsed (<see cref="PromptParser"/>); its <c>&lt;lora:NAME:TE:UNET:lbw=…&gt;</c> tags are resolved in the
/// <see cref="LoraLibrary"/> (names only, never paths), attached with the A1111 te/unet split and LoRA Block Weight
/// (<see cref="LoraBlockWeight"/>), unmerged (forward hooks) or merged into the weights, and detached after the run;</item>
/// <item>prompt and negative prompt are encoded separately in 75-token chunks with emphasis ("Original": weights, then
/// the chunk mean restored) and BREAK; SD1.x: hidden state [-clip skip] + final layer norm; SD2: the encoder's last
/// (= OpenCLIP penultimate) layer + norm; SDXL: both encoders' penultimate states concatenated, the pooled projection of
/// encoder 2 (first chunk) and time ids [h, w, 0, 0, h, w]; an empty SDXL negative prompt gives zero conditioning;</item>
/// <item>the sampler loop with classifier-free guidance, UNet batch [uncond; cond] (run separately when the two have
/// different lengths, unless padded), seeds per image (seed + i, each image with its own torch generator, also for the
/// noise of ancestral samplers), epsilon or v-prediction;</item>
/// <item>VAE decode of latents / scaling_factor (+ shift) → images in [-1, 1].</item>
/// </list>
/// Latents and the sampler run in float32; the networks in the model's dtype. Not thread-safe.
/// </summary>
public sealed class Txt2ImgPipeline : IDisposable
{
    readonly Dictionary<string, (AttachedAdapter Adapter, string Path)> _attached = new(StringComparer.Ordinal);
    readonly Dictionary<string, string> _hashes = new(StringComparer.Ordinal);
    AdapterHost? _host;
    readonly bool _ownsModel;

    public StableDiffusionModel Model { get; }
    /// <summary>Tokenizer of <c>text_encoder</c> (SD1: pads with &lt;|endoftext|&gt;; SD2: with 0).</summary>
    public ClipTokenizer Tokenizer { get; }
    /// <summary>Tokenizer of <c>text_encoder_2</c> (SDXL; pads with 0).</summary>
    public ClipTokenizer? Tokenizer2 { get; }
    public LoraLibrary? Loras { get; }
    /// <summary>The model's training schedule (betas, prediction type); the timestep spacing comes from the sampler or the request.</summary>
    public ScheduleConfig Schedule { get; }
    /// <summary>A1111's "Model" infotext field (the checkpoint's file name without extension).</summary>
    public string? ModelName { get; init; }
    /// <summary>A1111's "Model hash" (first 10 hex of the checkpoint file's SHA-256), or null.</summary>
    public string? ModelHash { get; init; }
    /// <summary>Presets for <c>lbw=NAME</c> (default: the extension's built-in ones).</summary>
    public IReadOnlyDictionary<string, string> BlockWeightPresets { get; set; } = LoraBlockWeight.DefaultPresets;

    public Txt2ImgPipeline(StableDiffusionModel model, ClipTokenizer tokenizer, ClipTokenizer? tokenizer2 = null, LoraLibrary? loras = null,
        ScheduleConfig? schedule = null) : this(model, tokenizer, tokenizer2, loras, schedule, ownsModel: false)
    {
    }

    Txt2ImgPipeline(StableDiffusionModel model, ClipTokenizer tokenizer, ClipTokenizer? tokenizer2, LoraLibrary? loras, ScheduleConfig? schedule, bool ownsModel)
    {
        if (model.Family == StableDiffusionFamily.SDXLRefiner ? model.TextEncoder2 is null : model.TextEncoder is null)
            throw new LoraSharpException("the model has no text encoder (it was loaded without text encoders)", key: "text_encoder");
        if (model.TextEncoder2 is not null && tokenizer2 is null)
            throw new ArgumentException("an SDXL model needs the second tokenizer (padding with 0)", nameof(tokenizer2));
        Model = model;
        Tokenizer = tokenizer;
        Tokenizer2 = tokenizer2;
        Loras = loras;
        Schedule = schedule ?? ScheduleConfig.StableDiffusion;
        _ownsModel = ownsModel;
    }

    /// <summary>
    /// Loads a diffusers folder or single-file checkpoint with its tokenizer(s) and scheduler config, the LoRA folder,
    /// and A1111's model hash of a checkpoint file (diffusers folders have none).
    /// </summary>
    public static Txt2ImgPipeline Load(string modelPath, Txt2ImgLoadOptions? options = null)
    {
        options ??= new Txt2ImgLoadOptions();
        bool isFolder = Directory.Exists(modelPath);
        if (!isFolder && !File.Exists(modelPath)) throw new LoraSharpException("model not found", modelPath);
        var loadOptions = new StableDiffusionLoadOptions
        {
            DType = options.DType,
            Device = options.Device,
            Config = options.ConfigFolder is null ? null : StableDiffusionConfig.FromDiffusersFolder(options.ConfigFolder),
        };
        var library = options.LoraFolder is null ? null : LoraLibrary.Open(options.LoraFolder);
        var model = StableDiffusionModel.Load(modelPath, loadOptions);
        try
        {
            if (options.VaePath is { Length: > 0 } vaePath) model.ReplaceVaeWeights(vaePath);
            var configRoot = isFolder ? modelPath : options.ConfigFolder;
            var schedule = ScheduleOf(configRoot, isFolder ? null : modelPath);
            var (tok, tok2) = LoadTokenizers(model, isFolder ? modelPath : null, options.TokenizerFolder ?? (isFolder ? null : SiblingTokenizer(modelPath)));
            return new Txt2ImgPipeline(model, tok, tok2, library, schedule, ownsModel: true)
            {
                ModelName = isFolder ? new DirectoryInfo(modelPath).Name : Path.GetFileNameWithoutExtension(modelPath),
                ModelHash = !isFolder && options.ComputeModelHash ? AdapterHashes.FileSha256(modelPath)[..10] : null,
            };
        }
        catch
        {
            model.Dispose();
            throw;
        }
    }

    static string? SiblingTokenizer(string file)
    {
        var dir = Path.Combine(Path.GetDirectoryName(Path.GetFullPath(file))!, "tokenizer");
        return Directory.Exists(dir) ? dir : null;
    }

    /// <summary>
    /// The schedule of a model: <c>scheduler/scheduler_config.json</c> of its (config) folder (betas, steps offset,
    /// prediction type; its timestep spacing belongs to the scheduler class it was saved for and is not used), else
    /// SD's defaults; a single file with an A1111-style <c>.yaml</c> next to it saying <c>parameterization: "v"</c> is v-prediction.
    /// </summary>
    public static ScheduleConfig ScheduleOf(string? diffusersFolder, string? checkpointFile)
    {
        var config = ScheduleConfig.StableDiffusion;
        if (diffusersFolder is not null)
        {
            var path = Path.Combine(diffusersFolder, "scheduler", "scheduler_config.json");
            if (File.Exists(path)) config = ScheduleConfig.FromDiffusersJson(path) with { Spacing = null };
        }
        if (checkpointFile is not null)
        {
            var yaml = Path.ChangeExtension(checkpointFile, ".yaml");
            if (File.Exists(yaml) && Regex.IsMatch(File.ReadAllText(yaml), @"^\s*parameterization:\s*[""']?v[""']?\s*$", RegexOptions.Multiline))
                config = config with { Prediction = PredictionType.VPrediction };
        }
        return config;
    }

    /// <summary>
    /// The tokenizers a model needs: <c>tokenizer/</c> (and <c>tokenizer_2/</c> for SDXL) of a diffusers folder, or
    /// <paramref name="tokenizerFolder"/> (used for both; the second pads with 0 as OpenCLIP does).
    /// </summary>
    public static (ClipTokenizer Tokenizer, ClipTokenizer? Tokenizer2) LoadTokenizers(StableDiffusionModel model, string? diffusersFolder, string? tokenizerFolder)
    {
        string? Find(string sub)
        {
            if (diffusersFolder is not null && Directory.Exists(Path.Combine(diffusersFolder, sub))) return Path.Combine(diffusersFolder, sub);
            return tokenizerFolder;
        }
        var first = tokenizerFolder ?? Find("tokenizer")
            ?? throw new LoraSharpException("no tokenizer found: the model has no tokenizer/ folder; pass a tokenizer folder (vocab.json + merges.txt, or bpe_simple_vocab_16e6.txt.gz)",
                diffusersFolder, "tokenizer");
        // SD2's OpenCLIP pads with 0; SD1's CLIP with <|endoftext|>.
        int? pad = model.Family == StableDiffusionFamily.SD2 ? 0 : null;
        var tok = ClipTokenizer.FromFolder(first, pad);
        ClipTokenizer? tok2 = null;
        if (model.TextEncoder2 is not null)
            tok2 = ClipTokenizer.FromFolder(tokenizerFolder ?? Find("tokenizer_2") ?? first, padId: 0);
        return (tok, tok2);
    }

    (Device Device, ScalarType DType) ModelPlacement()
    {
        var p = Model.Unet.parameters().First();
        return (p.device, p.dtype);
    }

    bool IsSdxl => Model.Family is StableDiffusionFamily.SDXLBase or StableDiffusionFamily.SDXLRefiner;

    /// <summary>
    /// Encodes one prompt (LoRA tags are removed from the text; apply LoRAs before calling). SD1/SD2: hidden state
    /// [-<paramref name="clipSkip"/>] + final layer norm (txt2img passes 1 for SD2 unless the request sets
    /// <see cref="Txt2ImgRequest.ClipSkipOnSd2"/>); SDXL: its fixed penultimate layers, and an empty negative prompt
    /// (<paramref name="isNegative"/>) gives zeros, as A1111 and diffusers do.
    /// </summary>
    public PromptEmbedding EncodePrompt(string prompt, int clipSkip = 1, bool isNegative = false, EmphasisMode emphasis = EmphasisMode.Original)
    {
        var parsed = PromptParser.Parse(prompt, parseEmphasis: emphasis != EmphasisMode.None);
        // Without weights other than 1 emphasis is the identity (z·1, mean ratio 1), except that "Original" would divide
        // 0 by 0 for a chunk whose mean is exactly 0 (possible with a final LayerNorm of zero bias): skip it then.
        if (parsed.Fragments.All(f => f.IsBreak || f.Weight == 1.0)) emphasis = EmphasisMode.None;
        var (device, dtype) = ModelPlacement();
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        Tensor context;
        Tensor? pooled = null;
        if (!IsSdxl)
        {
            var te = Model.TextEncoder!;
            if (clipSkip < 1 || clipSkip > te.Config.NumHiddenLayers)
                throw new LoraSharpException($"clip skip must be between 1 and {te.Config.NumHiddenLayers}, got {clipSkip}", key: "clip_skip");
            var tokens = PromptChunker.Tokenize(Tokenizer, parsed.Fragments);
            context = PromptConditioning.Encode(Tokenizer, [tokens], ids => te.Encode(ids, clipSkip), device, emphasis);
        }
        else
        {
            var te2 = Model.TextEncoder2!;
            var tokens2 = PromptChunker.Tokenize(Tokenizer2!, parsed.Fragments);
            var hidden2 = PromptConditioning.Encode(Tokenizer2!, [tokens2], ids => te2.Encode(ids, 2, applyFinalLayerNorm: false), device, emphasis);
            if (Model.TextEncoder is { } te1)
            {
                var tokens1 = PromptChunker.Tokenize(Tokenizer, parsed.Fragments);
                var hidden1 = PromptConditioning.Encode(Tokenizer, [tokens1], ids => te1.Encode(ids, 2, applyFinalLayerNorm: false), device, emphasis);
                if (hidden1.shape[1] != hidden2.shape[1])
                    throw new InvalidOperationException($"the two SDXL tokenizers chunked the prompt differently ({hidden1.shape[1]} vs {hidden2.shape[1]} tokens)");
                context = cat([hidden1, hidden2.to_type(hidden1.dtype)], -1);
            }
            else
            {
                context = hidden2;
            }
            // Pooled: the projected EOS state of encoder 2 on the first chunk (emphasis does not touch it).
            var firstIds = tensor(tokens2.Chunks[0].Tokens.Select(i => (long)i).ToArray(), dtype: ScalarType.Int64, device: device).unsqueeze(0);
            using var o = te2.call(firstIds);
            pooled = (o.TextEmbeds ?? o.PooledOutput).alias();
            if (isNegative && parsed.Text.Length == 0)
            {
                context = zeros_like(context);
                pooled = zeros_like(pooled);
            }
        }
        return new PromptEmbedding
        {
            Context = context.to_type(dtype).MoveToOuterDisposeScope(),
            Pooled = pooled?.to_type(dtype).MoveToOuterDisposeScope(),
        };
    }

    /// <summary>Runs txt2img. Errors in the request (bad LoRA tags, unknown names, sizes) throw <see cref="LoraSharpException"/> before any work.</summary>
    public Txt2ImgResult Generate(Txt2ImgRequest request, IProgress<StepInfo>? progress = null, CancellationToken cancellationToken = default)
    {
        Validate(request);
        var parsed = PromptParser.Parse(request.Prompt, parseEmphasis: request.Emphasis != EmphasisMode.None);
        parsed.ThrowIfInvalid();
        var negativeParsed = PromptParser.Parse(request.NegativePrompt);
        if (negativeParsed.Loras.Count > 0)
            throw new LoraSharpException("LoRA tags in the negative prompt are not supported (A1111 applies LoRAs from the prompt only): "
                + string.Join(", ", negativeParsed.Loras.Select(l => l.Name)), key: "negative_prompt");
        long seed = request.Seed >= 0 ? request.Seed : Random.Shared.NextInt64(0, uint.MaxValue);
        var seeds = Enumerable.Range(0, request.BatchSize).Select(i => seed + i).ToArray();
        try
        {
            var applied = ApplyLoras(parsed.Loras, request, seed);
            return Run(request, seeds, applied, progress, cancellationToken);
        }
        finally
        {
            if (!request.KeepLorasLoaded) DetachAll();
        }
    }

    static void Validate(Txt2ImgRequest r)
    {
        if (r.Width < 8 || r.Height < 8 || r.Width % 8 != 0 || r.Height % 8 != 0)
            throw new LoraSharpException($"width and height must be positive multiples of 8, got {r.Width}x{r.Height}", key: "size");
        if (r.BatchSize < 1) throw new LoraSharpException($"batch size must be at least 1, got {r.BatchSize}", key: "batch");
        if (r.Steps < 1) throw new LoraSharpException($"steps must be at least 1, got {r.Steps}", key: "steps");
        if (!double.IsFinite(r.CfgScale)) throw new LoraSharpException("CFG scale must be a finite number", key: "cfg");
    }

    IReadOnlyList<AppliedLora> ApplyLoras(IReadOnlyList<LoraRequest> requests, Txt2ImgRequest request, long seed)
    {
        if (requests.Count > 0 && Loras is null)
            throw new LoraSharpException($"the prompt asks for LoRAs ({string.Join(", ", requests.Select(r => r.Name))}) but no LoRA folder was given", key: "lora_dir");
        // Resolve and check everything before touching the model.
        var resolved = new List<(LoraRequest Request, LoraEntry Entry, double[]? Lbw)>();
        var random = new Random(unchecked((int)seed));
        foreach (var r in requests)
        {
            var entry = Loras!.Resolve(r.Name);
            if (resolved.Any(x => x.Entry.FullPath == entry.FullPath))
                throw new LoraSharpException($"LoRA '{r.Name}' appears more than once in the prompt", entry.FullPath, r.Name);
            if (r.DynamicDim is not null)
                throw new LoraSharpException($"<lora:{r.Name}:…> asks for a DyLoRA rank (dyn={r.DynamicDim}), which is not supported", entry.FullPath, "dyn");
            double[]? lbw = null;
            if (r.BlockWeights is { } spec)
            {
                lbw = LoraBlockWeight.Parse(spec, BlockWeightPresets, random);
                LoraBlockWeight.CheckFamily(lbw.Length, Model.Family);
            }
            resolved.Add((r, entry, lbw));
        }

        // Detach what this run does not use (kept from an earlier run), attach the new ones.
        foreach (var key in _attached.Keys.Where(k => resolved.All(x => x.Entry.FullPath != k)).ToList())
        {
            _host!.Detach(_attached[key].Adapter.Name);
            _attached.Remove(key);
        }
        var result = new List<AppliedLora>();
        foreach (var (r, entry, lbw) in resolved)
        {
            _host ??= new AdapterHost(Model);
            if (!_attached.TryGetValue(entry.FullPath, out var slot))
            {
                var internalName = "lora:" + entry.RelativePath;
                slot = (StableDiffusionLoras.Attach(_host, Model, entry.FullPath, internalName), entry.FullPath);
                _attached[entry.FullPath] = slot;
            }
            StableDiffusionLoras.SetMultipliers(slot.Adapter, r.TextEncoderWeight, r.UNetWeight);
            if (lbw is not null && !lbw.All(v => v == 1))
                slot.Adapter.ModuleWeight = LoraBlockWeight.ModuleWeights(Model, lbw);
            result.Add(new AppliedLora(r.Name, entry.FullPath, r.TextEncoderWeight, r.UNetWeight, r.BlockWeights, ShortHash(entry.FullPath)));
        }
        if (_host is not null)
        {
            if (request.MergeLoras) { if (_host.Mode != AdapterMode.Merged) _host.Merge(); else _host.ApplyPending(); }
            else if (_host.Mode == AdapterMode.Merged) _host.Unmerge();
        }
        return result;
    }

    /// <summary>A1111's LoRA short hash: the first 12 hex of the "addnet" hash (SHA-256 of the data section) of a safetensors file, or of the whole file's SHA-256 otherwise.</summary>
    public string ShortHash(string path)
    {
        if (!_hashes.TryGetValue(path, out var hash))
        {
            hash = path.EndsWith(".safetensors", StringComparison.OrdinalIgnoreCase) ? AdapterHashes.DataSectionSha256(path) : AdapterHashes.FileSha256(path);
            _hashes[path] = hash;
        }
        return hash[..12];
    }

    /// <summary>Detaches every LoRA the pipeline attached and restores the model's weights exactly.</summary>
    public void DetachAll()
    {
        if (_host is null) return;
        foreach (var (_, slot) in _attached) _host.Detach(slot.Adapter.Name);
        _attached.Clear();
        if (_host.Mode == AdapterMode.Merged) _host.Unmerge();
    }

    Txt2ImgResult Run(Txt2ImgRequest request, long[] seeds, IReadOnlyList<AppliedLora> loras, IProgress<StepInfo>? progress, CancellationToken ct)
    {
        var (device, dtype) = ModelPlacement();
        int batch = request.BatchSize;
        var schedule = Schedule with
        {
            Spacing = request.TimestepSpacing,
            Prediction = request.Prediction ?? Schedule.Prediction,
        };
        using var sampler = Samplers.Create(request.Sampler, request.Steps, schedule);
        using var noise = new PerImageNoise(seeds);
        using var noGrad = no_grad();
        using var outer = NewDisposeScope();

        using var cond = EncodePrompt(request.Prompt, ClipSkipOf(request), false, request.Emphasis);
        using var uncond = EncodePrompt(request.NegativePrompt, ClipSkipOf(request), true, request.Emphasis);
        bool guided = request.CfgScale != 1.0;
        var (condCtx, uncondCtx) = (cond.Context, uncond.Context);
        if (guided && request.PadCondUncond && condCtx.shape[1] != uncondCtx.shape[1])
            (condCtx, uncondCtx) = PadToSameLength(condCtx, uncondCtx, request);
        bool together = guided && condCtx.shape[1] == uncondCtx.shape[1];

        Tensor? timeIdsCond = null, timeIdsUncond = null;
        if (Model.Config.Unet.AdditionEmbedType == "text_time")
        {
            float h = request.Height, w = request.Width;
            float[] ids = Model.Family == StableDiffusionFamily.SDXLRefiner ? [h, w, 0, 0, 6f] : [h, w, 0, 0, h, w];
            float[] idsNeg = Model.Family == StableDiffusionFamily.SDXLRefiner ? [h, w, 0, 0, 2.5f] : ids;
            timeIdsCond = tensor(ids, device: device).unsqueeze(0).expand(batch, -1);
            timeIdsUncond = tensor(idsNeg, device: device).unsqueeze(0).expand(batch, -1);
        }

        Tensor Expand(Tensor t) => t.expand([batch, .. t.shape.Skip(1)]);
        Tensor Unet(Tensor x, Tensor t, Tensor ctx, Tensor? pooled, Tensor? timeIds) =>
            Model.Unet.Predict(x.to_type(dtype), t, ctx, pooled, timeIds?.to_type(ScalarType.Float32)).to_type(ScalarType.Float32);

        Tensor? batchedCtx = null, batchedPooled = null, batchedTimeIds = null;
        if (together)
        {
            batchedCtx = cat([Expand(uncondCtx), Expand(condCtx)], 0);
            if (cond.Pooled is not null) batchedPooled = cat([Expand(uncond.Pooled!), Expand(cond.Pooled)], 0);
            if (timeIdsCond is not null) batchedTimeIds = cat([timeIdsUncond!, timeIdsCond], 0);
        }

        var latentChannels = Model.Config.Unet.InChannels;
        long[] shape = [batch, latentChannels, request.Height / 8, request.Width / 8];
        var x = sampler.InitialLatents(shape, noise, ScalarType.Float32, device);
        var stepTimes = new List<TimeSpan>();
        var total = Stopwatch.StartNew();
        for (int i = 0; i < sampler.Steps; i++)
        {
            ct.ThrowIfCancellationRequested();
            var sw = Stopwatch.StartNew();
            using (var stepScope = NewDisposeScope())
            {
                var input = sampler.ScaleModelInput(x, i);
                var t = tensor(sampler.Timesteps[i], dtype: ScalarType.Float32, device: device);
                Tensor eps;
                if (!guided)
                {
                    eps = Unet(input, t, Expand(condCtx), cond.Pooled is null ? null : Expand(cond.Pooled), timeIdsCond);
                }
                else if (together)
                {
                    var output = Unet(cat([input, input], 0), t, batchedCtx!, batchedPooled, batchedTimeIds);
                    eps = Guidance.ApplyBatched(output, request.CfgScale);
                }
                else
                {
                    var u = Unet(input, t, Expand(uncondCtx), uncond.Pooled is null ? null : Expand(uncond.Pooled), timeIdsUncond);
                    var c = Unet(input, t, Expand(condCtx), cond.Pooled is null ? null : Expand(cond.Pooled), timeIdsCond);
                    eps = Guidance.Apply(u, c, request.CfgScale);
                }
                var next = sampler.Step(eps, i, x, noise).MoveToOuterDisposeScope();
                x.Dispose();
                x = next;
            }
            sw.Stop();
            stepTimes.Add(sw.Elapsed);
            progress?.Report(new StepInfo(i + 1, sampler.Steps, sampler.Timesteps[i], total.Elapsed));
        }

        Tensor? images = null;
        if (request.Decode)
        {
            if (Model.Vae is null) throw new LoraSharpException("the model has no VAE (it was loaded without one)", key: "vae");
            var vae = Model.Vae.Config;
            var decoded = new List<Tensor>();
            for (int b = 0; b < batch; b++)
            {
                using var scope = NewDisposeScope();
                var z = x.narrow(0, b, 1) / vae.ScalingFactor;
                if (vae.ShiftFactor is double shift) z = z + shift;
                decoded.Add(Model.Vae.Decode(z.to_type(dtype)).to_type(ScalarType.Float32).MoveToOuterDisposeScope());
            }
            images = cat(decoded, 0).MoveToOuterDisposeScope();
            foreach (var d in decoded) d.Dispose();
        }
        var latents = x.MoveToOuterDisposeScope();

        var loraHashes = loras.Select(l => new KeyValuePair<string, string>(l.Name.Replace(":", "").Replace(",", ""), l.ShortHash)).ToList();
        var parameters = seeds.Select(s => GenerationParameters.ForTxt2Img(request.Prompt, request.NegativePrompt, request.Steps, sampler.Name,
            request.CfgScale, s, request.Width, request.Height, ModelHash, ModelName, loraHashes,
            Model.Family == StableDiffusionFamily.SD1 || (Model.Family == StableDiffusionFamily.SD2 && request.ClipSkipOnSd2) ? request.ClipSkip : null)).ToList();
        return new Txt2ImgResult { Images = images, Latents = latents, Seeds = seeds, Parameters = parameters, Loras = loras, StepTimes = stepTimes };
    }

    /// <summary>The clip skip the SD1/SD2 text encoder runs with: A1111 ignores "Clip skip" for SD 2.x (1), unless the request asks for kohya's behaviour.</summary>
    int ClipSkipOf(Txt2ImgRequest request) => Model.Family == StableDiffusionFamily.SD2 && !request.ClipSkipOnSd2 ? 1 : request.ClipSkip;

    /// <summary>A1111's pad_cond_uncond: the shorter conditioning gets the empty prompt's encoding appended per missing chunk.</summary>
    (Tensor Cond, Tensor Uncond) PadToSameLength(Tensor cond, Tensor uncond, Txt2ImgRequest request)
    {
        using var empty = EncodePrompt("", ClipSkipOf(request), false, request.Emphasis);
        Tensor Pad(Tensor t, long target)
        {
            long missing = (target - t.shape[1]) / empty.Context.shape[1];
            return missing <= 0 ? t : cat([t, empty.Context.repeat(1, missing, 1)], 1);
        }
        long length = Math.Max(cond.shape[1], uncond.shape[1]);
        return (Pad(cond, length), Pad(uncond, length));
    }

    public void Dispose()
    {
        DetachAll();
        _host?.Dispose();
        _host = null;
        if (_ownsModel) Model.Dispose();
    }
}

/// <summary>
/// Noise for a batch whose image i has its own seeded torch generator (seed + i): a tensor [B, …] is drawn image by
/// image, so image i of a batch gets the same initial and ancestral noise as a single run with its seed (as A1111 does).
/// </summary>
public sealed class PerImageNoise : INoiseSource, IDisposable
{
    readonly GeneratorNoise[] _generators;

    public PerImageNoise(IReadOnlyList<long> seeds) => _generators = seeds.Select(s => new GeneratorNoise(s)).ToArray();

    public Tensor Next(long[] shape, ScalarType dtype, Device device)
    {
        if (shape.Length == 0 || shape[0] != _generators.Length)
            throw new ArgumentException($"expected a batch of {_generators.Length}, got shape [{string.Join(", ", shape)}]", nameof(shape));
        using var scope = NewDisposeScope();
        long[] one = [1, .. shape.Skip(1)];
        var parts = _generators.Select(g => g.Next(one, dtype, device)).ToList();
        return cat(parts, 0).MoveToOuterDisposeScope();
    }

    public void Dispose()
    {
        foreach (var g in _generators) g.Dispose();
    }
}
