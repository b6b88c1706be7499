using System.Globalization;
using System.Text.RegularExpressions;

namespace LoraSharp.Training.Diffusion;

/// <summary>kohya's per-step caption options (global, or per subset of a dataset config).</summary>
/// <param name="TokenWarmupMin">kohya token_warmup_min: tags (after keep_tokens) shown at step 0.</param>
/// <param name="TokenWarmupStep">kohya token_warmup_step: steps (or, below 1, a fraction of the run) over which the shown tags grow to all; 0 = off.</param>
/// <param name="Wildcard">kohya enable_wildcard: a multi-line caption file gives one random line per step, and {a|b|c} one random choice ({{ and }} are literal braces).</param>
/// <param name="Prefix">kohya caption_prefix, joined with a space before the caption.</param>
/// <param name="Suffix">kohya caption_suffix, joined with a space after it.</param>
/// <param name="KeepTokensSeparator">kohya keep_tokens_separator (e.g. "|||"): tags before it stay first, tags after a second one stay last (instead of keep_tokens).</param>
/// <param name="Separator">kohya caption_separator: what splits tags (default ",").</param>
/// <param name="SecondarySeparator">kohya secondary_separator: replaced by the separator after shuffling, so the tags it joins move together.</param>
public sealed record CaptionSettings(bool Shuffle = false, int KeepTokens = 0, double DropoutRate = 0, double TagDropoutRate = 0, int DropoutEveryNEpochs = 0,
    int TokenWarmupMin = 1, double TokenWarmupStep = 0, bool Wildcard = false, string Prefix = "", string Suffix = "",
    string KeepTokensSeparator = "", string Separator = ",", string SecondarySeparator = "");

/// <summary>
/// One <c>&lt;repeats&gt;_&lt;class tokens&gt;</c> folder (kohya DreamBooth convention), or one subset of a dataset config
/// (which may carry its own caption extension and caption options; null = the run's).
/// </summary>
public sealed record ConceptFolder(string Path, string Name, int Repeats, string ClassTokens, bool IsRegularization,
    string? CaptionExtension = null, CaptionSettings? Captions = null, bool? FlipAug = null, bool? RandomCrop = null);

/// <summary>One training image with its caption (sidecar file, or the folder's class tokens).</summary>
public sealed record TrainImage(string Path, string Caption, ConceptFolder Folder)
{
    public bool IsRegularization => Folder.IsRegularization;
}

/// <summary>
/// kohya's folder dataset: <c>train_data_dir/10_sks dog/*.png</c> = 10 repeats of concept "sks dog"; captions from
/// <c>&lt;image&gt;&lt;caption_extension&gt;</c> next to the image, else the class tokens. Regularisation folders follow the
/// same convention.
/// </summary>
public static partial class FolderDataset
{
    public static readonly string[] ImageExtensions = [".png", ".jpg", ".jpeg", ".webp", ".bmp"];

    [GeneratedRegex(@"^(\d+)_(.*)$", RegexOptions.CultureInvariant)]
    private static partial Regex FolderName();

    /// <summary>Parses a folder name: "10_sks dog" → (10, "sks dog"); null when the name does not follow the convention.</summary>
    public static (int Repeats, string ClassTokens)? ParseFolderName(string name)
    {
        var m = FolderName().Match(name);
        if (!m.Success || !int.TryParse(m.Groups[1].Value, NumberStyles.None, CultureInfo.InvariantCulture, out int repeats)) return null;
        return (repeats, m.Groups[2].Value.Trim());
    }

    /// <summary>The concept folders under a dataset root; folders not named &lt;repeats&gt;_&lt;tokens&gt; are reported in <paramref name="skipped"/>.</summary>
    public static List<ConceptFolder> Concepts(string root, bool regularization, List<string>? skipped = null)
    {
        if (!Directory.Exists(root)) throw new LoraSharpException("dataset folder not found", root, regularization ? "reg_data_dir" : "train_data_dir");
        var list = new List<ConceptFolder>();
        foreach (var dir in Directory.GetDirectories(root).OrderBy(d => d, StringComparer.Ordinal))
        {
            var name = System.IO.Path.GetFileName(dir);
            if (ParseFolderName(name) is not { } p)
            {
                skipped?.Add($"{dir}: folder name is not <repeats>_<class tokens>, ignored");
                continue;
            }
            if (p.Repeats < 1) { skipped?.Add($"{dir}: 0 repeats, ignored"); continue; }
            list.Add(new ConceptFolder(dir, name, p.Repeats, p.ClassTokens, regularization));
        }
        return list;
    }

    /// <summary>The images of a concept folder (sorted by name) with their captions.</summary>
    public static List<TrainImage> Images(ConceptFolder folder, string captionExtension, bool allLines = false)
    {
        var list = new List<TrainImage>();
        foreach (var file in Directory.GetFiles(folder.Path).OrderBy(f => f, StringComparer.Ordinal))
        {
            if (!ImageExtensions.Contains(System.IO.Path.GetExtension(file).ToLowerInvariant())) continue;
            var caption = ReadCaption(file, folder.CaptionExtension ?? captionExtension, folder.Captions?.Wildcard ?? allLines) ?? folder.ClassTokens;
            if (caption.Length == 0 && folder.CaptionExtension is not null)
                throw new LoraSharpException($"no caption file ({folder.CaptionExtension}) and the subset has no class_tokens", file, "class_tokens");
            list.Add(new TrainImage(file, caption, folder));
        }
        return list;
    }

    /// <summary>The sidecar caption (first non-empty line, trimmed; with <paramref name="allLines"/> every non-empty line, joined by newlines) or null when there is none.</summary>
    public static string? ReadCaption(string imagePath, string captionExtension, bool allLines = false)
    {
        var ext = captionExtension.StartsWith('.') ? captionExtension : "." + captionExtension;
        var p = System.IO.Path.ChangeExtension(imagePath, null) + ext;
        if (!File.Exists(p)) return null;
        var lines = File.ReadAllText(p).Split('\n').Select(l => l.Trim()).Where(l => l.Length > 0).ToList();
        if (lines.Count == 0) return null;
        return allLines ? string.Join("\n", lines) : lines[0];
    }

    /// <summary>kohya ss_tag_frequency: per folder name, the count of each comma-separated tag over its images.</summary>
    public static Dictionary<string, Dictionary<string, int>> TagFrequency(IEnumerable<TrainImage> images)
    {
        var result = new Dictionary<string, Dictionary<string, int>>(StringComparer.Ordinal);
        foreach (var img in images)
        {
            if (!result.TryGetValue(img.Folder.Name, out var counts)) result[img.Folder.Name] = counts = new(StringComparer.Ordinal);
            foreach (var tag in img.Caption.Split(',').Select(t => t.Trim()).Where(t => t.Length > 0))
                counts[tag] = counts.GetValueOrDefault(tag) + 1;
        }
        return result;
    }
}

/// <summary>
/// kohya caption processing per step: caption dropout (by rate, and every N-th epoch), tag shuffle and tag dropout
/// with the first <c>keep_tokens</c> tags fixed — with the image's subset settings when it has them.
/// </summary>
public sealed class CaptionProcessor(CaptionSettings settings)
{
    public CaptionProcessor(bool shuffle, int keepTokens, double dropoutRate, double tagDropoutRate = 0, int dropoutEveryNEpochs = 0)
        : this(new CaptionSettings(shuffle, keepTokens, dropoutRate, tagDropoutRate, dropoutEveryNEpochs)) { }

    public CaptionSettings Settings { get; } = settings;
    /// <summary>Optimizer steps of the run (a token_warmup_step below 1 is a fraction of it).</summary>
    public long TotalSteps { get; init; }

    /// <summary>The caption of an image for one step, with its subset's settings if any.</summary>
    public string Process(TrainImage image, Random rng, int epoch = 0, long step = 0) => Process(image.Caption, rng, epoch, image.Folder.Captions, step);

    /// <summary>The caption for optimizer step <paramref name="step"/> ("" when dropped); <paramref name="epoch"/> is 1-based (0 = unknown).</summary>
    public string Process(string caption, Random rng, int epoch = 0, CaptionSettings? settings = null, long step = 0)
    {
        var s = settings ?? Settings;
        if (s.Prefix.Length > 0) caption = s.Prefix + " " + caption;
        if (s.Suffix.Length > 0) caption = caption + " " + s.Suffix;
        if (s.DropoutRate > 0 && rng.NextDouble() < s.DropoutRate) return "";
        if (s.DropoutEveryNEpochs > 0 && epoch > 0 && epoch % s.DropoutEveryNEpochs == 0) return "";
        if (s.Wildcard) caption = Wildcards(caption, rng);
        long warmup = s.TokenWarmupStep is > 0 and < 1 ? (long)Math.Floor(s.TokenWarmupStep * TotalSteps) : (long)s.TokenWarmupStep;
        bool warming = warmup > 0 && step < warmup;
        if (s.Shuffle || s.TagDropoutRate > 0 || warming)
        {
            string[] Tags(string part) => part.Split(s.Separator).Select(t => t.Trim()).Where(t => t.Length > 0).ToArray();
            string[] head, rest, tail = [];
            if (s.KeepTokensSeparator.Length > 0 && caption.Contains(s.KeepTokensSeparator, StringComparison.Ordinal))
            {
                // kohya: "fixed ||| flexible ||| fixed suffix"
                var parts = caption.Split(s.KeepTokensSeparator, 3);
                head = Tags(parts[0]);
                rest = Tags(parts[1]);
                if (parts.Length == 3) tail = Tags(parts[2]);
            }
            else
            {
                var tags = Tags(caption);
                int keep = Math.Min(s.KeepTokens, tags.Length);
                head = tags[..keep];
                rest = tags[keep..];
            }
            // token warm-up (kohya): ⌊step·(tags − min)/warmup⌋ + min flexible tags, growing to all
            if (warming) rest = rest.Take((int)Math.Floor(step * ((rest.Length - s.TokenWarmupMin) / (double)warmup)) + s.TokenWarmupMin).ToArray();
            if (s.Shuffle) rng.Shuffle(rest);
            if (s.TagDropoutRate > 0) rest = rest.Where(_ => rng.NextDouble() >= s.TagDropoutRate).ToArray();
            caption = string.Join(", ", head.Concat(rest).Concat(tail));
        }
        if (s.SecondarySeparator.Length > 0) caption = caption.Replace(s.SecondarySeparator, s.Separator);
        return caption;
    }

    /// <summary>kohya's wildcards: one random line of a multi-line caption, then each {a|b|c} replaced by one random option ({{ and }} stay literal braces).</summary>
    public static string Wildcards(string caption, Random rng)
    {
        if (caption.Contains('\n'))
        {
            var lines = caption.Split('\n');
            caption = lines[rng.Next(lines.Length)];
        }
        const string open = "\u2985", close = "\u2986"; // placeholders for escaped braces
        caption = caption.Replace("{{", open).Replace("}}", close);
        caption = System.Text.RegularExpressions.Regex.Replace(caption, @"\{([^}]+)\}", m =>
        {
            var options = m.Groups[1].Value.Split('|');
            return options[rng.Next(options.Length)];
        });
        return caption.Replace(open, "{").Replace(close, "}");
    }
}
