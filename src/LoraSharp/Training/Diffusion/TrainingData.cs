using System.Security.Cryptography;
using LoraSharp.IO;
using LoraSharp.Models.StableDiffusion;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Training.Diffusion;

/// <summary>An image ready for training: its file, caption, bucket placement and original size.</summary>
public sealed record PlacedImage(TrainImage Image, BucketPlacement Placement, int OriginalWidth, int OriginalHeight)
{
    public (int W, int H) Bucket => (Placement.BucketWidth, Placement.BucketHeight);
}

/// <summary>The checked, bucketed dataset: train and regularisation images, plus what was skipped and why.</summary>
public sealed class TrainingDataset
{
    public required IReadOnlyList<PlacedImage> Train { get; init; }
    public required IReadOnlyList<PlacedImage> Regularization { get; init; }
    public required IReadOnlyList<ConceptFolder> Folders { get; init; }
    public required IReadOnlyList<string> Problems { get; init; }
    public required BucketManager Buckets { get; init; }

    /// <summary>Train images counted with their repeats (kohya ss_num_train_images).</summary>
    public int TrainImagesWithRepeats => Train.Sum(p => p.Image.Folder.Repeats);
    public int RegImagesWithRepeats => Regularization.Sum(p => p.Image.Folder.Repeats);

    /// <summary>Scans the folders, checks every image (bad ones skipped or, with bad_images = fail, an error) and places them in buckets.</summary>
    public static TrainingDataset Load(SdTrainConfig c, int minSide = 32)
    {
        var problems = new List<string>();
        List<ConceptFolder> folders;
        if (c.DatasetConfig is { Length: > 0 } datasetConfig)
        {
            // the dataset's resolution, batch size and buckets override the run's: read them before the buckets exist
            folders = DatasetConfig.Apply(datasetConfig, c);
            c.Validate();
        }
        else
        {
            folders = FolderDataset.Concepts(c.TrainDataDir, false, problems);
            if (c.RegDataDir is { Length: > 0 } reg) folders.AddRange(FolderDataset.Concepts(reg, true, problems));
        }
        var buckets = new BucketManager(c.Resolution, c.EnableBucket, c.MinBucketReso, c.MaxBucketReso, c.BucketResoSteps, c.BucketNoUpscale);
        var train = new List<PlacedImage>();
        var regs = new List<PlacedImage>();
        foreach (var f in folders)
        {
            foreach (var img in FolderDataset.Images(f, c.CaptionExtension))
            {
                var check = TrainImageLoader.Check(img.Path, minSide);
                if (!check.Ok)
                {
                    if (c.BadImages == "fail") throw new LoraSharpException($"{check.Problem}: {check.Detail}", img.Path, "bad_images");
                    problems.Add(check.ToString() + " — skipped");
                    continue;
                }
                var placed = new PlacedImage(img, buckets.Place(check.Width, check.Height), check.Width, check.Height);
                (f.IsRegularization ? regs : train).Add(placed);
            }
        }
        if (train.Count == 0)
            throw c.DatasetConfig is { Length: > 0 } dc
                ? new LoraSharpException("no usable training images in the subsets (is_reg = false) of the dataset config", dc, "datasets.subsets.image_dir")
                : new LoraSharpException("no usable training images (expected <repeats>_<class tokens> folders with png/jpg/webp images)", c.TrainDataDir, "train_data_dir");
        return new TrainingDataset { Train = train, Regularization = regs, Folders = folders, Problems = problems, Buckets = buckets };
    }

    /// <summary>
    /// One epoch of batches (kohya): every train image × its repeats, plus as many regularisation samples (cycling
    /// through the reg images) when there are any; grouped by bucket, shuffled inside each bucket, cut into batches, and
    /// the batch order shuffled.
    /// </summary>
    public List<List<PlacedImage>> EpochBatches(int batchSize, Random rng)
    {
        var items = new List<PlacedImage>();
        foreach (var p in Train) for (int r = 0; r < p.Image.Folder.Repeats; r++) items.Add(p);
        if (Regularization.Count > 0)
        {
            var regItems = new List<PlacedImage>();
            foreach (var p in Regularization) for (int r = 0; r < p.Image.Folder.Repeats; r++) regItems.Add(p);
            int n = items.Count;
            for (int i = 0; i < n; i++) items.Add(regItems[i % regItems.Count]);
        }
        var batches = new List<List<PlacedImage>>();
        foreach (var group in items.GroupBy(p => p.Bucket).OrderBy(g => g.Key.W).ThenBy(g => g.Key.H))
        {
            var arr = group.ToArray();
            rng.Shuffle(arr);
            for (int i = 0; i < arr.Length; i += batchSize) batches.Add(arr.Skip(i).Take(batchSize).ToList());
        }
        var shuffled = batches.ToArray();
        rng.Shuffle(shuffled);
        return shuffled.ToList();
    }

    /// <summary>Batches per epoch (independent of the shuffle).</summary>
    public int BatchesPerEpoch(int batchSize)
    {
        var counts = new Dictionary<(int, int), int>();
        foreach (var p in Train) counts[p.Bucket] = counts.GetValueOrDefault(p.Bucket) + p.Image.Folder.Repeats;
        if (Regularization.Count > 0)
        {
            int n = TrainImagesWithRepeats;
            var regItems = Regularization.SelectMany(p => Enumerable.Repeat(p, p.Image.Folder.Repeats)).ToList();
            for (int i = 0; i < n; i++) counts[regItems[i % regItems.Count].Bucket] = counts.GetValueOrDefault(regItems[i % regItems.Count].Bucket) + 1;
        }
        return counts.Values.Sum(v => (v + batchSize - 1) / batchSize);
    }
}

/// <summary>
/// VAE latents of training images, keyed by the image file's SHA-256 and the bucket placement, held in memory and
/// optionally on disk (<c>&lt;output_dir&gt;/latent_cache/&lt;sha&gt;_&lt;W&gt;x&lt;H&gt;_&lt;crop&gt;.safetensors</c>, written atomically).
/// Latents are <c>sample() · scaling_factor</c> in float32 (kohya caches a sample of the distribution).
/// </summary>
public sealed class LatentCache : IDisposable
{
    readonly AutoencoderKL _vae;
    readonly string? _diskFolder;
    readonly Dictionary<string, Tensor> _memory = new(StringComparer.Ordinal);
    readonly Dictionary<string, string> _fileHashes = new(StringComparer.Ordinal);
    readonly bool _keepInMemory;

    public LatentCache(AutoencoderKL vae, string? diskFolder, bool keepInMemory)
    {
        _vae = vae;
        _diskFolder = diskFolder;
        _keepInMemory = keepInMemory;
        if (diskFolder is not null) Directory.CreateDirectory(diskFolder);
    }

    public int Count => _memory.Count;
    public int DiskHits { get; private set; }
    public int Encoded { get; private set; }

    string KeyOf(PlacedImage p, bool flipped = false)
    {
        if (!_fileHashes.TryGetValue(p.Image.Path, out var h))
        {
            using var f = File.OpenRead(p.Image.Path);
            h = Convert.ToHexStringLower(SHA256.HashData(f))[..24];
            _fileHashes[p.Image.Path] = h;
        }
        var pl = p.Placement;
        return $"{h}_{pl.BucketWidth}x{pl.BucketHeight}_{pl.ResizedWidth}x{pl.ResizedHeight}+{pl.CropLeft}+{pl.CropTop}{(flipped ? "_flip" : "")}";
    }

    /// <summary>The latents [4, H/8, W/8] of an image, or of its mirror image (flip_aug) (float32, a new tensor owned by the caller).</summary>
    public Tensor Get(PlacedImage p, bool flipped = false)
    {
        var key = KeyOf(p, flipped);
        if (_memory.TryGetValue(key, out var t)) return t.clone();
        Tensor latents;
        string? file = _diskFolder is null ? null : Path.Combine(_diskFolder, key + ".safetensors");
        if (file is not null && File.Exists(file))
        {
            using var src = SafetensorsFile.Open(file);
            latents = src.Load("latents", ScalarType.Float32);
            DiskHits++;
        }
        else
        {
            latents = Encode(_vae, [p], flipped)[0];
            Encoded++;
            if (file is not null) SafetensorsWriter.Write(file, new KeyValuePair<string, Tensor>[] { new("latents", latents) }, new Dictionary<string, string> { ["image"] = Path.GetFileName(p.Image.Path) });
        }
        if (_keepInMemory)
        {
            _memory[key] = latents.clone().DetachFromDisposeScope();
        }
        return latents;
    }

    /// <summary>Encodes images (mirrored left–right with <paramref name="flipped"/>) with the VAE under no_grad: [N, 4, H/8, W/8] float32 latents (× scaling factor).</summary>
    public static Tensor Encode(AutoencoderKL vae, IReadOnlyList<PlacedImage> images, bool flipped = false)
    {
        using var noGrad = no_grad();
        using var scope = NewDisposeScope();
        var param = vae.parameters().First();
        var pixels = stack(images.Select(p => TrainImageLoader.LoadForBucket(p.Image.Path, p.Placement)).ToArray()).to(param.dtype).to(param.device);
        if (flipped) pixels = pixels.flip(-1);
        using var dist = vae.Encode(pixels);
        var latents = dist.Sample().to_type(ScalarType.Float32) * vae.Config.ScalingFactor;
        return latents.MoveToOuterDisposeScope();
    }

    public void Dispose()
    {
        foreach (var t in _memory.Values) t.Dispose();
        _memory.Clear();
    }
}
