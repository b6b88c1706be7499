using System.Globalization;
using Tomlyn;
using Tomlyn.Model;

namespace LoraSharp.Training.Diffusion;

/// <summary>
/// kohya's <c>dataset_config</c> TOML (the DreamBooth-style blueprint): <c>[general]</c> holds defaults for every
/// dataset and subset, each <c>[[datasets]]</c> sets its resolution, batch size and buckets (and defaults for its
/// subsets; batches never mix datasets), and each <c>[[datasets.subsets]]</c> is a folder of images: <c>image_dir</c>, <c>num_repeats</c>,
/// <c>class_tokens</c>, <c>is_reg</c>, <c>caption_extension</c> and the caption options. Values given here override the
/// training config (a dataset's <c>batch_size</c> becomes <c>train_batch_size</c>). Keys of kohya's features that
/// LoraSharp does not implement (colour augmentation, fine-tuning metadata files) are refused by
/// name unless they are off; unknown keys are errors naming the file and the key.
/// </summary>
public static class DatasetConfig
{
    static readonly HashSet<string> DatasetKeys = new(StringComparer.Ordinal)
    {
        "resolution", "batch_size", "enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale",
    };

    static readonly HashSet<string> SubsetKeys = new(StringComparer.Ordinal)
    {
        "image_dir", "num_repeats", "class_tokens", "is_reg", "caption_extension", "shuffle_caption", "keep_tokens",
        "caption_dropout_rate", "caption_tag_dropout_rate", "caption_dropout_every_n_epochs", "flip_aug", "random_crop",
        "token_warmup_min", "token_warmup_step", "enable_wildcard", "caption_prefix", "caption_suffix",
        "keep_tokens_separator", "caption_separator", "secondary_separator",
    };

    /// <summary>Subset keys of kohya features not implemented here: accepted only when off (false, 0 or empty).</summary>
    static readonly HashSet<string> OffOnlyKeys = new(StringComparer.Ordinal)
    {
        "color_aug", "face_crop_aug_range", "alpha_mask", "cache_info", "metadata_file",
        "conditioning_data_dir", "custom_attributes",
    };

    /// <summary>One <c>[[datasets]]</c>: its resolution, batch size and bucket settings, and its subsets as concept folders.</summary>
    public sealed record Dataset(SdTrainConfig Settings, List<ConceptFolder> Folders);

    /// <summary>
    /// The datasets of the file, each with its subsets as concept folders (caption options resolved) and its own
    /// resolution / batch size / bucket settings (a copy of <paramref name="config"/> with the dataset's values). The
    /// first dataset's values are also written into <paramref name="config"/> (what the run reports).
    /// </summary>
    public static List<Dataset> Apply(string path, SdTrainConfig config)
    {
        if (!File.Exists(path)) throw new LoraSharpException("dataset config not found", path, "dataset_config");
        TomlTable root;
        try { root = TomlSerializer.Deserialize<TomlTable>(File.ReadAllText(path))!; }
        catch (TomlException e) { throw new LoraSharpException($"not valid TOML: {e.Message}", path, "dataset_config", e); }
        var baseDir = Path.GetDirectoryName(Path.GetFullPath(path))!;

        var general = root.TryGetValue("general", out var g) ? g as TomlTable ?? throw Bad("general", "expected a table [general]") : new TomlTable();
        foreach (var key in root.Keys)
            if (key is not ("general" or "datasets")) throw Bad(key, "unknown top-level key (expected [general] and [[datasets]])");
        if (!root.TryGetValue("datasets", out var ds) || ds is not TomlTableArray datasets || datasets.Count == 0)
            throw Bad("datasets", "expected at least one [[datasets]] table");
        Check(general, "general", DatasetKeys.Concat(SubsetKeys).Concat(OffOnlyKeys));
        var result = new List<Dataset>();
        foreach (var dataset in datasets)
        {
            // general → dataset → subset: the most specific value wins
            Check(dataset, "datasets", DatasetKeys.Concat(SubsetKeys).Concat(OffOnlyKeys).Append("subsets"));
            var settings = config.Clone();
            foreach (var target in result.Count == 0 ? new[] { settings, config } : [settings])
                foreach (var key in DatasetKeys)
                {
                    if (Inherited(dataset, key) is not { } value) continue;
                    target.Set(key == "batch_size" ? "train_batch_size" : key, key == "resolution" ? Resolution(value) : value, path);
                }
            result.Add(new Dataset(settings, Subsets(dataset, settings)));
        }
        return result;

        object? Inherited(TomlTable dataset, string key) => dataset.TryGetValue(key, out var v) ? v : general.TryGetValue(key, out var gv) ? gv : null;

        List<ConceptFolder> Subsets(TomlTable dataset, SdTrainConfig config)
        {
            object? DatasetValue(string key) => Inherited(dataset, key);

            if (!dataset.TryGetValue("subsets", out var ss) || ss is not TomlTableArray subsets || subsets.Count == 0)
                throw Bad("datasets.subsets", "expected at least one [[datasets.subsets]] table");
            var folders = new List<ConceptFolder>();
            foreach (var subset in subsets)
            {
                Check(subset, "datasets.subsets", SubsetKeys.Concat(OffOnlyKeys));
                object? Value(string key) => subset.TryGetValue(key, out var v) ? v : DatasetValue(key);
                T Get<T>(string key, T fallback, Func<object, T> convert)
                {
                    if (Value(key) is not { } v) return fallback;
                    try { return convert(v); }
                    catch (Exception e) when (e is FormatException or InvalidCastException or OverflowException)
                    {
                        throw Bad($"datasets.subsets.{key}", $"'{v}' has the wrong type: {e.Message}");
                    }
                }
                string Str(object v) => v as string ?? throw new FormatException("expected a string");
                var dir = Get<string?>("image_dir", null, Str) ?? throw Bad("datasets.subsets.image_dir", "is required");
                dir = Path.GetFullPath(Path.IsPathRooted(dir) ? dir : Path.Combine(baseDir, dir));
                if (!Directory.Exists(dir)) throw new LoraSharpException("image_dir not found", path, "datasets.subsets.image_dir " + dir);
                int repeats = Get("num_repeats", 1, v => Convert.ToInt32(v, CultureInfo.InvariantCulture));
                if (repeats < 1) throw Bad("datasets.subsets.num_repeats", "must be at least 1");
                var captions = new CaptionSettings(
                    Get("shuffle_caption", config.ShuffleCaption, v => (bool)v),
                    Get("keep_tokens", config.KeepTokens, v => Convert.ToInt32(v, CultureInfo.InvariantCulture)),
                    Get("caption_dropout_rate", config.CaptionDropoutRate, v => Convert.ToDouble(v, CultureInfo.InvariantCulture)),
                    Get("caption_tag_dropout_rate", config.CaptionTagDropoutRate, v => Convert.ToDouble(v, CultureInfo.InvariantCulture)),
                    Get("caption_dropout_every_n_epochs", config.CaptionDropoutEveryNEpochs, v => Convert.ToInt32(v, CultureInfo.InvariantCulture)),
                    Get("token_warmup_min", config.TokenWarmupMin, v => Convert.ToInt32(v, CultureInfo.InvariantCulture)),
                    Get("token_warmup_step", config.TokenWarmupStep, v => Convert.ToDouble(v, CultureInfo.InvariantCulture)),
                    Get("enable_wildcard", config.EnableWildcard, v => (bool)v),
                    Get("caption_prefix", config.CaptionPrefix, Str),
                    Get("caption_suffix", config.CaptionSuffix, Str),
                    Get("keep_tokens_separator", config.KeepTokensSeparator, Str),
                    Get("caption_separator", config.CaptionSeparator, Str),
                    Get("secondary_separator", config.SecondarySeparator, Str));
                if (captions.DropoutRate is < 0 or > 1 || captions.TagDropoutRate is < 0 or > 1)
                    throw Bad("datasets.subsets.caption_dropout_rate", "caption dropout rates must be in [0, 1]");
                if (config.CacheTextEncoderOutputs && (captions.Shuffle || captions.DropoutRate > 0 || captions.TagDropoutRate > 0 || captions.DropoutEveryNEpochs > 0 || captions.TokenWarmupStep > 0 || captions.Wildcard))
                    throw Bad("datasets.subsets.shuffle_caption", "cache_text_encoder_outputs needs fixed captions: this subset shuffles or drops them");
                var classTokens = Get("class_tokens", "", Str);
                var name = $"{repeats}_{(classTokens.Length > 0 ? classTokens : Path.GetFileName(dir))}";
                folders.Add(new ConceptFolder(dir, name, repeats, classTokens, Get("is_reg", false, v => (bool)v),
                    Get("caption_extension", config.CaptionExtension, Str), captions, Get("flip_aug", config.FlipAug, v => (bool)v),
                    Get("random_crop", config.RandomCrop, v => (bool)v)));
                if (folders[^1].RandomCrop == true && (config.CacheLatents || config.CacheLatentsToDisk))
                    throw Bad("datasets.subsets.random_crop", "crops differently every step, so latents cannot be cached: drop cache_latents");
            }
            return folders;
        }

        LoraSharpException Bad(string key, string what) => new(what, path, key);

        void Check(TomlTable table, string where, IEnumerable<string> allowed)
        {
            var ok = allowed.ToHashSet(StringComparer.Ordinal);
            foreach (var (key, value) in table)
            {
                if (!ok.Contains(key))
                    throw Bad($"{where}.{key}", $"unknown key in [{where}] (valid: {string.Join(", ", ok.Order(StringComparer.Ordinal))})");
                if (OffOnlyKeys.Contains(key) && !IsOff(value))
                    throw Bad($"{where}.{key}", $"kohya's {key} is not supported by LoraSharp; remove it or turn it off");
            }
        }
    }

    static bool IsOff(object? v) => v switch
    {
        null => true,
        bool b => !b,
        long l => l == 0,
        double d => d == 0,
        string s => s.Length == 0,
        TomlArray a => a.Count == 0,
        _ => false,
    };

    /// <summary>kohya writes resolution as 512, "512", [768, 512] or "768,512".</summary>
    static string Resolution(object v) => v switch
    {
        TomlArray { Count: 2 } a => $"{Convert.ToInt64(a[0], CultureInfo.InvariantCulture)},{Convert.ToInt64(a[1], CultureInfo.InvariantCulture)}",
        long l => l.ToString(CultureInfo.InvariantCulture),
        string s => s,
        _ => throw new FormatException($"'{v}' is not a resolution (512, \"768,512\" or [768, 512])"),
    };
}
