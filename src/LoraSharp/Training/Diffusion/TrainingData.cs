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

/// <summary>One dataset of a run: its buckets and batch size, its train and regularisation images (batches never mix datasets).</summary>
public sealed record DatasetPart(BucketManager Buckets, int BatchSize, IReadOnlyList<PlacedImage> Train, IReadOnlyList<PlacedImage> Regularization);

/// <summary>The checked, bucketed dataset: train and regularisation images, plus what was skipped and why.</summary>
public sealed class TrainingDataset
{
    public required IReadOnlyList<PlacedImage> Train { get; init; }
    public required IReadOnlyList<PlacedImage> Regularization { get; init; }
    public required IReadOnlyList<ConceptFolder> Folders { get; init; }
    public required IReadOnlyList<string> Problems { get; init; }
    /// <summary>The first dataset's buckets.</summary>
    public required BucketManager Buckets { get; init; }
    /// <summary>The datasets (one unless a dataset_config has several [[datasets]]); default: one made of Train, Regularization and Buckets.</summary>
    public IReadOnlyList<DatasetPart> Parts
    {
        get => _parts ??= [new DatasetPart(Buckets, 0, Train, Regularization)];
        init => _parts = value;
    }
    IReadOnlyList<DatasetPart>? _parts;

    /// <summary>Train images counted with their repeats (kohya ss_num_train_images).</summary>
    public int TrainImagesWithRepeats => Train.Sum(p => p.Image.Folder.Repeats);
    public int RegImagesWithRepeats => Regularization.Sum(p => p.Image.Folder.Repeats);
    /// <summary>The largest batch size of the datasets.</summary>
    public int MaxBatchSize => Parts.Max(p => p.BatchSize);

    /// <summary>Scans the folders, checks every image (bad ones skipped or, with bad_images = fail, an error) and places them in buckets.</summary>
    public static TrainingDataset Load(SdTrainConfig c, int minSide = 32)
    {
        var problems = new List<string>();
        var specs = new List<(SdTrainConfig Settings, List<ConceptFolder> Folders)>();
        if (c.DatasetConfig is { Length: > 0 } datasetConfig)
        {
            // the datasets' resolutions, batch sizes and buckets override the run's: read them before the buckets exist
            specs.AddRange(DatasetConfig.Apply(datasetConfig, c).Select(d => (d.Settings, d.Folders)));
            c.Validate();
            foreach (var (settings, _) in specs) settings.Validate();
        }
        else
        {
            var folders = FolderDataset.Concepts(c.TrainDataDir, false, problems);
            if (c.RegDataDir is { Length: > 0 } reg) folders.AddRange(FolderDataset.Concepts(reg, true, problems));
            specs.Add((c, folders));
        }
        var parts = new List<DatasetPart>();
        foreach (var (s, folders) in specs)
        {
            var buckets = new BucketManager(s.Resolution, s.EnableBucket, s.MinBucketReso, s.MaxBucketReso, s.BucketResoSteps, s.BucketNoUpscale);
            var train = new List<PlacedImage>();
            var regs = new List<PlacedImage>();
            foreach (var f in folders)
            {
                foreach (var img in FolderDataset.Images(f, c.CaptionExtension, c.EnableWildcard))
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
            parts.Add(new DatasetPart(buckets, s.TrainBatchSize, train, regs));
        }
        if (parts.Sum(p => p.Train.Count) == 0)
            throw c.DatasetConfig is { Length: > 0 } dc
                ? new LoraSharpException("no usable training images in the subsets (is_reg = false) of the dataset config", dc, "datasets.subsets.image_dir")
                : new LoraSharpException("no usable training images (expected <repeats>_<class tokens> folders with png/jpg/webp images)", c.TrainDataDir, "train_data_dir");
        return new TrainingDataset
        {
            Train = parts.SelectMany(p => p.Train).ToList(), Regularization = parts.SelectMany(p => p.Regularization).ToList(),
            Folders = specs.SelectMany(s => s.Folders).ToList(), Problems = problems, Buckets = parts[0].Buckets, Parts = parts,
        };
    }

    /// <summary>
    /// One epoch of batches (kohya): per dataset, every train image × its repeats, plus as many regularisation samples
    /// (cycling through the dataset's reg images) when there are any; grouped by bucket, shuffled inside each bucket, cut
    /// into batches of the dataset's batch size (<paramref name="batchSize"/> for a folder dataset); then the batches of
    /// all datasets are shuffled together.
    /// </summary>
    public List<List<PlacedImage>> EpochBatches(int batchSize, Random rng)
    {
        var batches = new List<List<PlacedImage>>();
        foreach (var part in Parts)
        {
            var items = Items(part);
            int size = Parts.Count == 1 ? batchSize : part.BatchSize;
            foreach (var group in items.GroupBy(p => p.Bucket).OrderBy(g => g.Key.W).ThenBy(g => g.Key.H))
            {
                var arr = group.ToArray();
                rng.Shuffle(arr);
                for (int i = 0; i < arr.Length; i += size) batches.Add(arr.Skip(i).Take(size).ToList());
            }
        }
        var shuffled = batches.ToArray();
        rng.Shuffle(shuffled);
        return shuffled.ToList();
    }

    /// <summary>A dataset's samples of one epoch: train images × repeats, then as many (cycled) regularisation samples.</summary>
    static List<PlacedImage> Items(DatasetPart part)
    {
        var items = new List<PlacedImage>();
        foreach (var p in part.Train) for (int r = 0; r < p.Image.Folder.Repeats; r++) items.Add(p);
        if (part.Regularization.Count > 0)
        {
            var regItems = new List<PlacedImage>();
            foreach (var p in part.Regularization) for (int r = 0; r < p.Image.Folder.Repeats; r++) regItems.Add(p);
            int n = items.Count;
            for (int i = 0; i < n; i++) items.Add(regItems[i % regItems.Count]);
        }
        return items;
    }

    /// <summary>Batches per epoch (independent of the shuffle).</summary>
    public int BatchesPerEpoch(int batchSize) =>
        Parts.Sum(part =>
        {
            int size = Parts.Count == 1 ? batchSize : part.BatchSize;
            return Items(part).GroupBy(p => p.Bucket).Sum(g => (g.Count() + size - 1) / size);
        });
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
