using System.Globalization;
using System.Text;
using LoraSharp.IO;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Models.StableDiffusion;

/// <summary>
/// Single-file Stable Diffusion checkpoints in the original ldm (SD1/SD2) or SGM (SDXL) layout: family detection from
/// keys and shapes, configs derived from shapes, loading through <see cref="LdmKeyMap"/> / <see cref="ClipKeyMap"/>, and a
/// text description for <c>lorasharp inspect</c>.
/// </summary>
public static class StableDiffusionCheckpoint
{
    /// <summary>Root of the UNet in single files.</summary>
    public const string UNetRoot = "model.diffusion_model.";
    /// <summary>Root of the VAE in single files.</summary>
    public const string VaeRoot = "first_stage_model.";
    /// <summary>SD1 text encoder root (HF CLIP names follow).</summary>
    public const string Sd1TextRoot = "cond_stage_model.transformer.";
    /// <summary>SD2 text encoder root (OpenCLIP names follow).</summary>
    public const string Sd2TextRoot = "cond_stage_model.model.";
    /// <summary>SDXL base encoder 1 root (HF CLIP names follow).</summary>
    public const string SdxlText1Root = "conditioner.embedders.0.transformer.";
    /// <summary>SDXL base encoder 2 root (OpenCLIP names follow).</summary>
    public const string SdxlText2Root = "conditioner.embedders.1.model.";
    /// <summary>SDXL refiner's only encoder (OpenCLIP bigG).</summary>
    public const string RefinerTextRoot = "conditioner.embedders.0.model.";

    /// <summary>Opens a single-file checkpoint (.safetensors or PyTorch zip .ckpt) by content; a .ckpt's <c>state_dict.</c>
    /// level is hidden so keys read <c>model.diffusion_model.…</c>. Dispose the result.</summary>
    public static ITensorSource Open(string path) => StableDiffusionModel.OpenTensors(path);

    /// <summary>Loads a single-file checkpoint (config derived from the file unless <see cref="StableDiffusionLoadOptions.Config"/> is given).</summary>
    public static StableDiffusionModel Load(string path, StableDiffusionLoadOptions? options = null)
    {
        using var source = StableDiffusionModel.OpenTensors(path);
        return Load(source, options);
    }

    /// <summary>Loads from an open tensor source in the ldm/SGM layout.</summary>
    public static StableDiffusionModel Load(ITensorSource source, StableDiffusionLoadOptions? options = null)
    {
        options ??= new StableDiffusionLoadOptions();
        source = StateDictView.Unwrap(source, ownsInner: false);
        var config = options.Config ?? DeriveConfig(source);
        if (config.Family == StableDiffusionFamily.Unknown)
            config = config with { Family = DetectFamily(source) }; // an override without a family: the file's layout decides
        var family = config.Family;
        // Built on the meta device (no memory, no random initialisation); loading puts every parameter on options.Device.
        var model = new StableDiffusionModel(config, StableDiffusionModel.MetaDevice, options.DType, options.LoadVae, options.LoadTextEncoders, options.VaeDType);
        try
        {
            var consumed = new HashSet<string>();
            var reports = new List<WeightLoadReport>();
            foreach (var (name, module, mappings) in ComponentMappings(model, source, options.UseEma))
                reports.Add(WeightCopy.Copy(module, name, source, mappings, consumed, materializeOn: options.Device));

            // File-level leftovers: keys of loaded components no parameter read, plus keys of components not loaded.
            var leftover = source.Keys.Where(k => !consumed.Contains(k)).ToList();
            bool NotRequested(string k) =>
                (!options.LoadVae && k.StartsWith(VaeRoot, StringComparison.Ordinal))
                || (!options.LoadTextEncoders && (k.StartsWith("cond_stage_model.", StringComparison.Ordinal) || k.StartsWith("conditioner.", StringComparison.Ordinal)))
                || (options.UseEma && k.StartsWith(UNetRoot, StringComparison.Ordinal))
                || DroppedSd2Layer(k, family, config.TextEncoder)
                || (family == StableDiffusionFamily.SD2 && k == Sd2TextRoot + "text_projection");
            var summary = StableDiffusionModel.WithUnexpected(new WeightLoadReport { Component = "file", FilePath = source.FilePath }, leftover, options.ThrowOnUnexpected, NotRequested);
            reports.Add(summary);
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
    /// Loads a standalone VAE file (A1111 <c>.vae.safetensors</c> / <c>.vae.pt</c> in ldm names, with or without the
    /// <c>first_stage_model.</c> root, or a diffusers <c>vae/</c> weights file or folder). The config defaults to the
    /// folder's config.json, else to SD's VAE derived from the shapes (scaling factor 0.18215 unless given).
    /// </summary>
    public static AutoencoderKL LoadVae(string path, VaeConfig? config = null, ScalarType dtype = ScalarType.Float32, Device? device = null)
    {
        if (Directory.Exists(path))
        {
            config ??= VaeConfig.FromJsonFile(Path.Combine(path, "config.json"));
            path = StableDiffusionModel.WeightsFile(path);
        }
        using var source = Open(path);
        bool diffusers = source.Keys.Any(k => k.StartsWith("encoder.down_blocks.", StringComparison.Ordinal));
        string root = source.Keys.Any(k => k.StartsWith(VaeRoot, StringComparison.Ordinal)) ? VaeRoot : "";
        if (config is null)
        {
            if (diffusers)
                throw new LoraSharpException("a diffusers-layout VAE file needs its config.json (load the folder, or pass a VaeConfig)", path);
            var view = root == VaeRoot ? source : new PrefixedView(source, VaeRoot);
            config = DeriveVae(view, StableDiffusionFamily.SD1);
        }
        var vae = new AutoencoderKL(config, StableDiffusionModel.MetaDevice, dtype);
        try
        {
            var keys = WeightCopy.StateKeys(vae);
            var mappings = diffusers ? WeightCopy.Identity(vae) : LdmKeyMap.ForVae(config).Mappings(keys, root);
            var consumed = new HashSet<string>();
            WeightCopy.Copy(vae, "vae", source, mappings, consumed, materializeOn: device);
            var unexpected = source.Keys.Where(k => !consumed.Contains(k) && !StableDiffusionModel.IsIgnorable(k)
                && (root == "" || k.StartsWith(root, StringComparison.Ordinal))).ToList();
            if (unexpected.Count > 0)
                throw new LoraSharpException($"{unexpected.Count} keys match no VAE parameter: {string.Join(", ", unexpected.Take(10))}", path);
            return vae;
        }
        catch
        {
            vae.Dispose();
            throw;
        }
    }

    /// <summary>Keys seen with a prefix added (so derivation code written for a root can read a root-less file).</summary>
    sealed class PrefixedView(ITensorSource inner, string prefix) : ITensorSource
    {
        public string FilePath => inner.FilePath;
        public IReadOnlyList<string> Keys { get; } = inner.Keys.Select(k => prefix + k).ToArray();
        public IReadOnlyDictionary<string, string> Metadata => inner.Metadata;
        public TensorInfo Info(string key) => inner.Info(Strip(key)) with { Key = key };
        public bool Contains(string key) => key.StartsWith(prefix, StringComparison.Ordinal) && inner.Contains(Strip(key));
        public Tensor Load(string key, ScalarType? dtype = null, Device? device = null) => inner.Load(Strip(key), dtype, device);
        public void Dispose() { }
        string Strip(string key) => key.StartsWith(prefix, StringComparison.Ordinal) ? key[prefix.Length..] : key;
    }

    /// <summary>ldm EMA key of a UNet key: <c>model_ema.</c> + the path after <c>model.</c> with its dots removed.</summary>
    public static string EmaKey(string unetKey) =>
        "model_ema." + unetKey["model.".Length..].Replace(".", "", StringComparison.Ordinal);

    /// <summary>
    /// Each present component's name, module and parameter mappings in the single-file layout of the model's family
    /// (the same data drives <see cref="Load(ITensorSource, StableDiffusionLoadOptions?)"/> and <see cref="Save"/>).
    /// </summary>
    public static IEnumerable<(string Name, nn.Module Module, IReadOnlyList<KeyMapping> Mappings)> ComponentMappings(
        StableDiffusionModel model, ITensorSource? source = null, bool useEma = false)
    {
        var config = model.Config;
        var family = config.Family;
        Func<string, string>? ema = useEma ? EmaKey : null;
        yield return ("unet", model.Unet, LdmKeyMap.ForUNet(config.Unet).Mappings(WeightCopy.StateKeys(model.Unet), UNetRoot, ema));
        if (model.Vae is not null)
            yield return ("vae", model.Vae, LdmKeyMap.ForVae(config.Vae!).Mappings(WeightCopy.StateKeys(model.Vae), VaeRoot));
        if (model.TextEncoder is not null)
            yield return ("text_encoder", model.TextEncoder, TextEncoderMappings(source, family, model.TextEncoder));
        if (model.TextEncoder2 is not null)
        {
            var root = family == StableDiffusionFamily.SDXLRefiner ? RefinerTextRoot : SdxlText2Root;
            yield return ("text_encoder_2", model.TextEncoder2, ClipKeyMap.OpenClip(model.TextEncoder2.Config, root));
        }
    }

    /// <summary>
    /// Every parameter of the composite model (<c>unet.…</c>, <c>vae.…</c>, <c>text_encoder.…</c>, <c>text_encoder_2.…</c>)
    /// → its key in the family's single-file layout, with the transform between the two (e.g.
    /// <c>text_encoder_2.text_model.encoder.layers.0.self_attn.k_proj.weight</c> → row block 1 of
    /// <c>conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight</c>). For adapter formats that name
    /// modules by their single-file paths (kohya SDXL: <c>lora_unet_input_blocks_4_1_…</c>).
    /// </summary>
    public static IReadOnlyDictionary<string, KeyMapping> SingleFileKeyMap(StableDiffusionModel model)
    {
        var map = new Dictionary<string, KeyMapping>(StringComparer.Ordinal);
        foreach (var (name, _, mappings) in ComponentMappings(model))
            foreach (var m in mappings)
                map[name + "." + m.Target] = m with { Target = name + "." + m.Target };
        return map;
    }

    /// <summary>
    /// <see cref="SingleFileKeyMap(StableDiffusionModel)"/> for a file, from its headers only (config derived from the
    /// shapes unless given; the model is built on the meta device, so nothing is allocated or read).
    /// </summary>
    public static IReadOnlyDictionary<string, KeyMapping> SingleFileKeyMap(ITensorSource source, StableDiffusionConfig? config = null)
    {
        source = StateDictView.Unwrap(source, ownsInner: false);
        config ??= DeriveConfig(source);
        using var model = new StableDiffusionModel(config, StableDiffusionModel.MetaDevice);
        return SingleFileKeyMap(model);
    }

    /// <summary>
    /// Writes the model as one safetensors file in its family's ldm/SGM layout (the inverse of loading: q/k/v fused back
    /// into OpenCLIP <c>in_proj</c>, <c>text_projection</c> transposed, VAE attention as 1×1 convs). Tensors are written
    /// in <paramref name="dtype"/> (default: the parameters' dtype).
    /// </summary>
    public static void Save(StableDiffusionModel model, string path, IReadOnlyDictionary<string, string>? metadata = null, ScalarType? dtype = null)
    {
        if (model.Family == StableDiffusionFamily.Unknown)
            throw new LoraSharpException("cannot choose a single-file layout for a model of unknown family", path);
        var pending = new List<PendingTensor>();
        foreach (var (_, module, mappings) in ComponentMappings(model))
        {
            var parameters = module.named_parameters().ToDictionary(p => p.name, p => (Tensor)p.parameter);
            foreach (var group in mappings.GroupBy(m => m.Source))
            {
                var maps = group.OrderBy(m => m.Chunk).ToArray();
                var first = maps[0];
                var p0 = parameters[first.Target];
                var type = dtype ?? p0.dtype;
                long[] shape = first.Transform switch
                {
                    TensorTransform.FusedQkvChunk => [p0.shape[0] * 3, .. p0.shape[1..]],
                    TensorTransform.Transpose => [p0.shape[1], p0.shape[0]],
                    TensorTransform.LinearAsConv1x1 => [.. p0.shape, 1, 1],
                    _ => p0.shape,
                };
                pending.Add(new PendingTensor(group.Key, type, shape, () =>
                {
                    using var noGrad = no_grad();
                    var t = first.Transform switch
                    {
                        TensorTransform.FusedQkvChunk => cat(maps.Select(m => parameters[m.Target]).ToArray(), 0),
                        TensorTransform.Transpose => p0.t().contiguous(),
                        _ => p0.reshape(shape),
                    };
                    return t.to_type(type);
                }));
            }
        }
        SafetensorsWriter.Write(path, pending, metadata);
    }

    static IReadOnlyList<KeyMapping> TextEncoderMappings(ITensorSource? source, StableDiffusionFamily family, ClipTextModel te)
    {
        var keys = WeightCopy.StateKeys(te);
        switch (family)
        {
            case StableDiffusionFamily.SD2:
                return ClipKeyMap.OpenClip(te.Config, Sd2TextRoot);
            case StableDiffusionFamily.SDXLBase:
                return ClipKeyMap.HuggingFace(keys, SdxlText1Root);
            default:
                // SD1: old checkpoints store the HF model without the text_model level.
                bool nested = source is null || source.Keys.Any(k => k.StartsWith(Sd1TextRoot + "text_model.", StringComparison.Ordinal));
                return nested
                    ? ClipKeyMap.HuggingFace(keys, Sd1TextRoot)
                    : keys.Select(k => new KeyMapping(k, Sd1TextRoot + (k.StartsWith("text_model.", StringComparison.Ordinal) ? k["text_model.".Length..] : k))).ToArray();
        }
    }

    static bool DroppedSd2Layer(string key, StableDiffusionFamily family, ClipTextConfig? te) =>
        family == StableDiffusionFamily.SD2 && te is not null
        && key.StartsWith($"{Sd2TextRoot}transformer.resblocks.{te.NumHiddenLayers}.", StringComparison.Ordinal);

    // ---------------------------------------------------------------- detection

    /// <summary>The family of a single file, from its text encoder roots, else from the UNet's context width.</summary>
    public static StableDiffusionFamily DetectFamily(ITensorSource source)
    {
        source = StateDictView.Unwrap(source, ownsInner: false);
        bool Has(string prefix) => source.Keys.Any(k => k.StartsWith(prefix, StringComparison.Ordinal));
        if (!Has(UNetRoot)) return StableDiffusionFamily.Unknown;
        if (Has(SdxlText2Root)) return StableDiffusionFamily.SDXLBase;
        if (Has(RefinerTextRoot)) return StableDiffusionFamily.SDXLRefiner;
        if (Has(Sd2TextRoot)) return StableDiffusionFamily.SD2;
        if (Has(Sd1TextRoot)) return StableDiffusionFamily.SD1;
        // No text encoder: decide by the UNet alone.
        var toK = source.Keys.FirstOrDefault(k => k.StartsWith(UNetRoot, StringComparison.Ordinal) && k.EndsWith("attn2.to_k.weight", StringComparison.Ordinal));
        long context = toK is null ? 0 : source.Info(toK).Shape[1];
        bool label = source.Contains(UNetRoot + "label_emb.0.0.weight");
        return (label, context) switch
        {
            (true, 2048) => StableDiffusionFamily.SDXLBase,
            (true, 1280) => StableDiffusionFamily.SDXLRefiner,
            (false, 1024) => StableDiffusionFamily.SD2,
            (false, 768) => StableDiffusionFamily.SD1,
            _ => StableDiffusionFamily.Unknown,
        };
    }

    /// <summary>
    /// Configs derived from the file's shapes: UNet widths, levels, layers, attention levels, transformer depths, context
    /// width, linear projection, added conditioning; VAE widths and layers; text encoder widths, depths, projection.
    /// What shapes cannot tell comes from the family's convention: heads (SD1: 8 per level; others: width/64), text
    /// encoder heads (width/64), activations, group count 32, VAE scaling factor. Override with
    /// <see cref="StableDiffusionLoadOptions.Config"/> (e.g. <c>derived with { Unet = derived.Unet with { ... } }</c>).
    /// </summary>
    public static StableDiffusionConfig DeriveConfig(ITensorSource source)
    {
        source = StateDictView.Unwrap(source, ownsInner: false);
        var family = DetectFamily(source);
        if (family == StableDiffusionFamily.Unknown)
            throw new LoraSharpException("not a Stable Diffusion single-file checkpoint in ldm/SGM layout (need model.diffusion_model.* and a known text encoder root)", source.FilePath);

        ClipTextConfig? te = null, te2 = null;
        switch (family)
        {
            case StableDiffusionFamily.SD1 when HasPrefix(source, Sd1TextRoot):
                te = DeriveHfClip(source, Sd1TextRoot);
                break;
            case StableDiffusionFamily.SD2 when HasPrefix(source, Sd2TextRoot):
                te = DeriveOpenClip(source, Sd2TextRoot, withProjection: false);
                te = te with { NumHiddenLayers = te.NumHiddenLayers - 1 }; // diffusers' SD2 encoder drops the last layer (penultimate conditioning)
                break;
            case StableDiffusionFamily.SDXLBase:
                if (HasPrefix(source, SdxlText1Root)) te = DeriveHfClip(source, SdxlText1Root);
                if (HasPrefix(source, SdxlText2Root)) te2 = DeriveOpenClip(source, SdxlText2Root, withProjection: true);
                break;
            case StableDiffusionFamily.SDXLRefiner:
                if (HasPrefix(source, RefinerTextRoot)) te2 = DeriveOpenClip(source, RefinerTextRoot, withProjection: true);
                break;
        }
        var unet = DeriveUNet(source, family, te2?.ProjectionDim);
        var vae = HasPrefix(source, VaeRoot) ? DeriveVae(source, family) : null;
        return new StableDiffusionConfig { Family = family, Unet = unet, Vae = vae, TextEncoder = te, TextEncoder2 = te2 };
    }

    static bool HasPrefix(ITensorSource s, string prefix) => s.Keys.Any(k => k.StartsWith(prefix, StringComparison.Ordinal));

    static long[] ShapeOf(ITensorSource s, string key) =>
        s.Contains(key) ? s.Info(key).Shape : throw new LoraSharpException("expected tensor is missing", s.FilePath, key);

    /// <summary>Distinct values of the integer that follows <paramref name="prefix"/> in the file's keys.</summary>
    static SortedSet<int> Indices(ITensorSource s, string prefix)
    {
        var set = new SortedSet<int>();
        foreach (var k in s.Keys)
        {
            if (!k.StartsWith(prefix, StringComparison.Ordinal)) continue;
            int end = k.IndexOf('.', prefix.Length);
            if (end > prefix.Length && int.TryParse(k.AsSpan(prefix.Length, end - prefix.Length), NumberStyles.None, CultureInfo.InvariantCulture, out int i))
                set.Add(i);
        }
        return set;
    }

    static UNetConfig DeriveUNet(ITensorSource s, StableDiffusionFamily family, int? pooledDim)
    {
        const string r = UNetRoot;
        var convIn = ShapeOf(s, r + "input_blocks.0.0.weight");
        var inputIndices = Indices(s, r + "input_blocks.");
        if (inputIndices.Count == 0)
            throw new LoraSharpException("no UNet input blocks (model.diffusion_model.input_blocks.*)", s.FilePath);
        int inputBlocks = inputIndices.Max + 1;
        int firstDown = Indices(s, r + "input_blocks.").FirstOrDefault(i => s.Contains($"{r}input_blocks.{i}.0.op.weight"));
        if (firstDown == 0)
            throw new LoraSharpException("cannot find the first downsampler (input_blocks.N.0.op.weight)", s.FilePath);
        int layers = firstDown - 1;
        if (inputBlocks % (layers + 1) != 0)
            throw new LoraSharpException($"{inputBlocks} input blocks do not divide into levels of {layers} resnets + downsampler", s.FilePath);
        int levels = inputBlocks / (layers + 1);

        var boc = new int[levels];
        var down = new string[levels];
        var depth = new int[levels];
        bool linear = false;
        long context = 0;
        for (int i = 0; i < levels; i++)
        {
            int first = i * (layers + 1) + 1;
            boc[i] = (int)ShapeOf(s, $"{r}input_blocks.{first}.0.out_layers.3.weight")[0];
            var attn = $"{r}input_blocks.{first}.1.";
            bool hasAttn = s.Contains(attn + "proj_in.weight");
            down[i] = hasAttn ? "CrossAttnDownBlock2D" : "DownBlock2D";
            depth[i] = hasAttn ? Indices(s, attn + "transformer_blocks.").Count : 1;
            if (hasAttn)
            {
                linear = ShapeOf(s, attn + "proj_in.weight").Length == 2;
                context = ShapeOf(s, attn + "transformer_blocks.0.attn2.to_k.weight")[1];
            }
        }
        // The mid block's depth is diffusers' transformer_layers_per_block[-1].
        int midDepth = Indices(s, r + "middle_block.1.transformer_blocks.").Count;
        if (midDepth > 0) depth[^1] = midDepth;
        if (context == 0 && s.Contains(r + "middle_block.1.transformer_blocks.0.attn2.to_k.weight"))
            context = ShapeOf(s, r + "middle_block.1.transformer_blocks.0.attn2.to_k.weight")[1];

        int[] heads = family == StableDiffusionFamily.SD1
            ? Enumerable.Repeat(8, levels).ToArray()
            : boc.Select(c => Math.Max(1, c / 64)).ToArray();

        string? addType = null;
        int? addTimeDim = null, projDim = null;
        if (s.Contains(r + "label_emb.0.0.weight"))
        {
            addType = "text_time";
            projDim = (int)ShapeOf(s, r + "label_emb.0.0.weight")[1];
            int numbers = family == StableDiffusionFamily.SDXLRefiner ? 5 : 6;
            addTimeDim = pooledDim is int p && (projDim - p) % numbers == 0 ? (projDim - p) / numbers : 256;
        }
        var config = new UNetConfig
        {
            InChannels = (int)convIn[1],
            OutChannels = (int)ShapeOf(s, r + "out.2.weight")[0],
            BlockOutChannels = boc,
            DownBlockTypes = down,
            UpBlockTypes = down.Reverse().Select(t => t == "CrossAttnDownBlock2D" ? "CrossAttnUpBlock2D" : "UpBlock2D").ToArray(),
            LayersPerBlock = Enumerable.Repeat(layers, levels).ToArray(),
            TransformerLayersPerBlock = depth,
            AttentionHeads = heads,
            CrossAttentionDim = (int)context,
            UseLinearProjection = linear,
            AdditionEmbedType = addType,
            AdditionTimeEmbedDim = addTimeDim,
            ProjectionClassEmbeddingsInputDim = projDim,
            SampleSize = family is StableDiffusionFamily.SDXLBase or StableDiffusionFamily.SDXLRefiner ? 128 : 64,
        };
        config.Validate(s.FilePath);
        return config;
    }

    static VaeConfig DeriveVae(ITensorSource s, StableDiffusionFamily family)
    {
        const string r = VaeRoot;
        var levels = Indices(s, r + "encoder.down.");
        var boc = levels.Select(i => (int)ShapeOf(s, $"{r}encoder.down.{i}.block.0.conv2.weight")[0]).ToArray();
        int layers = Indices(s, r + "encoder.down.0.block.").Count;
        if (boc.Length == 0 || layers == 0)
            throw new LoraSharpException("no VAE encoder blocks (first_stage_model.encoder.down.N.block.M.*)", s.FilePath);
        return new VaeConfig
        {
            InChannels = (int)ShapeOf(s, r + "encoder.conv_in.weight")[1],
            OutChannels = (int)ShapeOf(s, r + "decoder.conv_out.weight")[0],
            LatentChannels = (int)ShapeOf(s, r + "decoder.conv_in.weight")[1],
            BlockOutChannels = boc,
            LayersPerBlock = layers,
            ScalingFactor = family is StableDiffusionFamily.SDXLBase or StableDiffusionFamily.SDXLRefiner ? 0.13025 : 0.18215,
            MidBlockAddAttention = s.Contains(r + "encoder.mid.attn_1.q.weight"),
            UseQuantConv = s.Contains(r + "quant_conv.weight"),
            UsePostQuantConv = s.Contains(r + "post_quant_conv.weight"),
        };
    }

    static ClipTextConfig DeriveHfClip(ITensorSource s, string root)
    {
        string r = s.Keys.Any(k => k.StartsWith(root + "text_model.", StringComparison.Ordinal)) ? root + "text_model." : root;
        var tok = ShapeOf(s, r + "embeddings.token_embedding.weight");
        int hidden = (int)tok[1];
        return new ClipTextConfig
        {
            VocabSize = (int)tok[0],
            HiddenSize = hidden,
            IntermediateSize = (int)ShapeOf(s, r + "encoder.layers.0.mlp.fc1.weight")[0],
            NumHiddenLayers = Indices(s, r + "encoder.layers.").Count,
            NumAttentionHeads = Math.Max(1, hidden / 64),
            MaxPositionEmbeddings = (int)ShapeOf(s, r + "embeddings.position_embedding.weight")[0],
            HiddenAct = "quick_gelu",
        };
    }

    static ClipTextConfig DeriveOpenClip(ITensorSource s, string root, bool withProjection)
    {
        var tok = ShapeOf(s, root + "token_embedding.weight");
        int hidden = (int)tok[1];
        int? projection = withProjection && s.Contains(root + "text_projection") ? (int)ShapeOf(s, root + "text_projection")[1] : null;
        return new ClipTextConfig
        {
            VocabSize = (int)tok[0],
            HiddenSize = hidden,
            IntermediateSize = (int)ShapeOf(s, root + "transformer.resblocks.0.mlp.c_fc.weight")[0],
            NumHiddenLayers = Indices(s, root + "transformer.resblocks.").Count,
            NumAttentionHeads = Math.Max(1, hidden / 64),
            MaxPositionEmbeddings = (int)ShapeOf(s, root + "positional_embedding")[0],
            HiddenAct = "gelu",
            ProjectionDim = projection,
        };
    }

    // ---------------------------------------------------------------- description

    /// <summary>
    /// A text description of a checkpoint for <c>lorasharp inspect</c>: family, layout, components with tensor and
    /// parameter counts and dtypes, EMA presence, and the derived configuration.
    /// </summary>
    public static string Describe(ITensorSource source)
    {
        source = StateDictView.Unwrap(source, ownsInner: false);
        var sb = new StringBuilder();
        var family = DetectFamily(source);
        sb.AppendLine(CultureInfo.InvariantCulture, $"File: {source.FilePath}");
        sb.AppendLine(CultureInfo.InvariantCulture, $"Family: {FamilyName(family)}");
        sb.AppendLine(CultureInfo.InvariantCulture, $"Layout: {(source.Keys.Any(k => k.StartsWith(UNetRoot, StringComparison.Ordinal)) ? (family is StableDiffusionFamily.SDXLBase or StableDiffusionFamily.SDXLRefiner ? "SGM single file" : "ldm single file") : "unknown")}");
        var components = new (string Name, string Root)[]
        {
            ("unet", UNetRoot), ("vae", VaeRoot), ("text_encoder (CLIP, HF names)", Sd1TextRoot), ("text_encoder (OpenCLIP)", Sd2TextRoot),
            ("text_encoder (CLIP, HF names)", SdxlText1Root), ("text_encoder_2 (OpenCLIP)", SdxlText2Root), ("text_encoder_2 (OpenCLIP)", RefinerTextRoot),
            ("unet EMA", "model_ema."),
        };
        long total = 0;
        var seen = new HashSet<string>();
        sb.AppendLine("Components:");
        foreach (var (name, root) in components)
        {
            var keys = source.Keys.Where(k => k.StartsWith(root, StringComparison.Ordinal)).ToList();
            if (keys.Count == 0) continue;
            long parameters = 0;
            var dtypes = new SortedDictionary<string, int>(StringComparer.Ordinal);
            foreach (var k in keys)
            {
                seen.Add(k);
                var info = source.Info(k);
                if (!StableDiffusionModel.IsIgnorable(k) || root == "model_ema.") parameters += info.ElementCount;
                dtypes[info.DType] = dtypes.GetValueOrDefault(info.DType) + 1;
            }
            if (root != "model_ema.") total += parameters;
            sb.AppendLine(CultureInfo.InvariantCulture,
                $"  {name,-30} {root,-38} {keys.Count,6} tensors {FormatCount(parameters),8} params  {string.Join(", ", dtypes.Select(d => $"{d.Key}×{d.Value}"))}");
        }
        var other = source.Keys.Where(k => !seen.Contains(k)).ToList();
        if (other.Count > 0)
            sb.AppendLine(CultureInfo.InvariantCulture, $"  other keys: {other.Count} ({string.Join(", ", other.Take(5))}{(other.Count > 5 ? ", …" : "")})");
        sb.AppendLine(CultureInfo.InvariantCulture, $"Parameters (without EMA): {FormatCount(total)} ({total:N0})");
        if (family != StableDiffusionFamily.Unknown)
        {
            try
            {
                var c = DeriveConfig(source);
                var u = c.Unet;
                sb.AppendLine(CultureInfo.InvariantCulture,
                    $"UNet: channels [{string.Join(", ", u.BlockOutChannels)}], {u.LayersPerBlock[0]} resnets per level, attention [{string.Join(", ", u.DownBlockTypes.Select(t => t.StartsWith("CrossAttn", StringComparison.Ordinal) ? "yes" : "no"))}], transformer depth [{string.Join(", ", u.TransformerLayersPerBlock)}], context {u.CrossAttentionDim}, {(u.UseLinearProjection ? "linear" : "conv")} proj_in/out{(u.AdditionEmbedType is null ? "" : $", added conditioning {u.AdditionEmbedType} ({u.ProjectionClassEmbeddingsInputDim})")}");
                if (c.TextEncoder is { } t1)
                    sb.AppendLine(CultureInfo.InvariantCulture, $"text_encoder: width {t1.HiddenSize}, {t1.NumHiddenLayers} layers used, MLP {t1.IntermediateSize}, {t1.HiddenAct}");
                if (c.TextEncoder2 is { } t2)
                    sb.AppendLine(CultureInfo.InvariantCulture, $"text_encoder_2: width {t2.HiddenSize}, {t2.NumHiddenLayers} layers, MLP {t2.IntermediateSize}, {t2.HiddenAct}, projection {t2.ProjectionDim}");
                if (c.Vae is { } v)
                    sb.AppendLine(CultureInfo.InvariantCulture, $"VAE: channels [{string.Join(", ", v.BlockOutChannels)}], {v.LatentChannels} latent channels, scaling factor {v.ScalingFactor}");
            }
            catch (LoraSharpException e)
            {
                sb.AppendLine("Config: cannot derive (" + e.Problem + ")");
            }
        }
        return sb.ToString();
    }

    /// <summary>
    /// <see cref="Describe(ITensorSource)"/> for a single file, or for a diffusers folder: family from the configs, and
    /// each component's weights file with its tensor and parameter counts and dtypes.
    /// </summary>
    public static string Describe(string path)
    {
        if (!Directory.Exists(path))
        {
            using var source = Open(path);
            return Describe(source);
        }
        var config = StableDiffusionConfig.FromDiffusersFolder(path);
        var sb = new StringBuilder();
        sb.AppendLine(CultureInfo.InvariantCulture, $"Folder: {Path.GetFullPath(path)}");
        sb.AppendLine(CultureInfo.InvariantCulture, $"Family: {FamilyName(config.Family)}");
        sb.AppendLine("Layout: diffusers folder");
        sb.AppendLine("Components:");
        long total = 0;
        foreach (var component in new[] { "unet", "vae", "text_encoder", "text_encoder_2" })
        {
            var folder = Path.Combine(path, component);
            if (!Directory.Exists(folder)) continue;
            var file = StableDiffusionModel.WeightsFile(folder);
            using var source = Open(file);
            long parameters = 0;
            var dtypes = new SortedDictionary<string, int>(StringComparer.Ordinal);
            foreach (var k in source.Keys)
            {
                var info = source.Info(k);
                if (!StableDiffusionModel.IsIgnorable(k)) parameters += info.ElementCount;
                dtypes[info.DType] = dtypes.GetValueOrDefault(info.DType) + 1;
            }
            total += parameters;
            sb.AppendLine(CultureInfo.InvariantCulture,
                $"  {component,-16} {Path.GetFileName(file),-40} {source.Keys.Count,6} tensors {FormatCount(parameters),8} params  {string.Join(", ", dtypes.Select(d => $"{d.Key}×{d.Value}"))}");
        }
        sb.AppendLine(CultureInfo.InvariantCulture, $"Parameters: {FormatCount(total)} ({total:N0})");
        var u = config.Unet;
        sb.AppendLine(CultureInfo.InvariantCulture,
            $"UNet: channels [{string.Join(", ", u.BlockOutChannels)}], heads [{string.Join(", ", u.AttentionHeads)}], transformer depth [{string.Join(", ", u.TransformerLayersPerBlock)}], context {u.CrossAttentionDim}, {(u.UseLinearProjection ? "linear" : "conv")} proj_in/out");
        if (config.Vae is { } v)
            sb.AppendLine(CultureInfo.InvariantCulture, $"VAE: channels [{string.Join(", ", v.BlockOutChannels)}], scaling factor {v.ScalingFactor}");
        return sb.ToString();
    }

    /// <summary>Human name of a family.</summary>
    public static string FamilyName(StableDiffusionFamily family) => family switch
    {
        StableDiffusionFamily.SD1 => "Stable Diffusion 1.x",
        StableDiffusionFamily.SD2 => "Stable Diffusion 2.x",
        StableDiffusionFamily.SDXLBase => "Stable Diffusion XL base",
        StableDiffusionFamily.SDXLRefiner => "Stable Diffusion XL refiner",
        _ => "unknown",
    };

    static string FormatCount(long n) => n switch
    {
        >= 1_000_000_000 => (n / 1e9).ToString("0.00", CultureInfo.InvariantCulture) + "B",
        >= 1_000_000 => (n / 1e6).ToString("0.0", CultureInfo.InvariantCulture) + "M",
        >= 1_000 => (n / 1e3).ToString("0.0", CultureInfo.InvariantCulture) + "K",
        _ => n.ToString(CultureInfo.InvariantCulture),
    };
}
