using System.Diagnostics;
using LoraSharp.Diffusion;
using LoraSharp.Imaging;
using LoraSharp.Training.Diffusion;

namespace LoraSharp.Demo;

/// <summary>Where the quickstart finds its inputs and writes its outputs.</summary>
public sealed record QuickstartOptions
{
    /// <summary>The kohya-style TOML (paths in it are relative to <see cref="Root"/>).</summary>
    public string ConfigPath { get; init; } = Path.Combine("examples", "quickstart", "quickstart.toml");
    /// <summary>The repository root (relative paths resolve against it). Default: found from the working directory.</summary>
    public string? Root { get; init; }
    /// <summary>Overrides output_dir of the TOML.</summary>
    public string? OutputDir { get; init; }
    /// <summary>Overrides max_train_steps (tests train shorter).</summary>
    public int? MaxTrainSteps { get; init; }
    public int SeedsPerPrompt { get; init; } = 6;
    public IReadOnlyList<string>? Prompts { get; init; }
    /// <summary>Classifier-free guidance scale of the evaluation images (both arms).</summary>
    public double CfgScale { get; init; } = 5;
    /// <summary>Sampler (A1111 name) and steps of the evaluation images.</summary>
    public string Sampler { get; init; } = "DDIM";
    public int SampleSteps { get; init; } = 25;
    /// <summary>Evaluate this existing adapter file instead of training one (the TOML still gives the model and output folder).</summary>
    public string? AdapterPath { get; init; }
}

/// <summary>What the quickstart did.</summary>
/// <param name="MeanAbsoluteDifference">Mean |LoRA image − base image| over all prompts and seeds (pixels in [−1, 1]).</param>
public sealed record QuickstartResult(string AdapterPath, string GridPath, string? LossCurvePath, ConceptRate Base, ConceptRate Lora, TimeSpan TrainTime, TimeSpan EvalTime, long Steps, double FinalLoss,
    double MeanAbsoluteDifference);

/// <summary>
/// The one-command tour: trains a LoRA for the demo model's held-out concept ("sks star", a shape the base model never
/// saw) with <see cref="SdTrainer"/> from <c>examples/quickstart/quickstart.toml</c>, then generates the same prompts
/// and seeds with and without it through <see cref="Txt2ImgPipeline"/>, measures the star rate of both
/// (<see cref="StarDetector"/>) and writes a before/after grid.
/// </summary>
public sealed class Quickstart(QuickstartOptions options, Action<string>? log = null)
{
    readonly Action<string> _log = log ?? (_ => { });
    public event Action<TrainProgress>? TrainProgress;
    public event Action<int, int>? EvalProgress;

    /// <summary>The folder holding <c>models/demo/demo-sd.safetensors</c>, searched upwards from the working directory and from the program's folder.</summary>
    public static string FindRoot()
    {
        foreach (var start in new[] { Directory.GetCurrentDirectory(), AppContext.BaseDirectory })
        {
            for (var d = new DirectoryInfo(start); d is not null; d = d.Parent)
                if (File.Exists(Path.Combine(d.FullName, "models", "demo", "demo-sd.safetensors"))) return d.FullName;
        }
        throw new LoraSharpException("cannot find models/demo/demo-sd.safetensors above the working directory; run from the LoraSharp repository (or pass --root)",
            Directory.GetCurrentDirectory());
    }

    /// <summary>Reads the TOML and makes its paths absolute (relative to the root).</summary>
    public static SdTrainConfig LoadConfig(string root, string configPath, string? outputDir, int? maxSteps)
    {
        var path = Path.IsPathRooted(configPath) ? configPath : Path.Combine(root, configPath);
        var c = SdTrainConfig.FromToml(path);
        string Abs(string p) => Path.IsPathRooted(p) ? p : Path.GetFullPath(Path.Combine(root, p));
        c.PretrainedModelNameOrPath = Abs(c.PretrainedModelNameOrPath);
        if (c.TokenizerPath is { Length: > 0 } tp) c.TokenizerPath = Abs(tp);
        c.TrainDataDir = Abs(c.TrainDataDir);
        c.OutputDir = outputDir is not null ? Path.GetFullPath(outputDir) : Abs(c.OutputDir);
        if (maxSteps is { } m) c.MaxTrainSteps = m;
        c.Validate();
        return c;
    }

    public QuickstartResult Run(CancellationToken cancel = default)
    {
        var root = options.Root ?? FindRoot();
        var config = LoadConfig(root, options.ConfigPath, options.OutputDir, options.MaxTrainSteps);
        if (!Directory.Exists(config.TrainDataDir) || !Directory.EnumerateFiles(config.TrainDataDir, "*.png", SearchOption.AllDirectories).Any())
        {
            _log($"drawing the training set into {config.TrainDataDir}");
            ShapeScenes.WriteKohyaFolder(config.TrainDataDir, 10, "sks star", "sks star", DemoShape.Star, 64, DemoModel.ImageSize, 7);
        }
        Directory.CreateDirectory(config.OutputDir);

        // ---- train (or take the given adapter)
        var sw = Stopwatch.StartNew();
        SdTrainResult trained;
        if (options.AdapterPath is { } given)
        {
            given = Path.GetFullPath(given);
            if (!File.Exists(given)) throw new LoraSharpException("adapter file not found", given);
            var copy = Path.Combine(config.OutputDir, Path.GetFileName(given));
            if (!string.Equals(copy, given, StringComparison.Ordinal)) File.Copy(given, copy, overwrite: true);
            trained = new SdTrainResult { AdapterPath = copy, SavedAdapters = [copy], SampleImages = [], Losses = [], Steps = 0, Epochs = 0, SecondsPerStep = 0 };
        }
        else
        {
            using var trainer = new SdTrainer(config, _log);
            trainer.Progress += p => TrainProgress?.Invoke(p);
            trained = trainer.Train(cancel);
        }
        var trainTime = sw.Elapsed;

        // ---- before / after
        sw.Restart();
        var loraName = Path.GetFileNameWithoutExtension(trained.AdapterPath);
        using var pipeline = Txt2ImgPipeline.Load(config.PretrainedModelNameOrPath, new Txt2ImgLoadOptions
        {
            TokenizerFolder = config.TokenizerPath,
            LoraFolder = config.OutputDir,
        });
        var prompts = options.Prompts ?? ConceptEval.DefaultPrompts();
        using var comparison = ConceptEval.Compare(pipeline, loraName, prompts, options.SeedsPerPrompt, steps: options.SampleSteps, cfg: options.CfgScale, sampler: options.Sampler, progress: (d, t) => EvalProgress?.Invoke(d, t));
        var gridPath = Path.Combine(config.OutputDir, "quickstart_grid.png");
        using (var grid = comparison.Grid())
            PngImage.Save(grid, gridPath);
        var evalTime = sw.Elapsed;
        double finalLoss = trained.Losses.Count == 0 ? double.NaN : trained.Losses.Skip(Math.Max(0, trained.Losses.Count - Math.Max(1, trained.Losses.Count / 10))).Average();
        double diff = comparison.BaseImages.Zip(comparison.LoraImages).SelectMany(p => p.First.Zip(p.Second))
            .Average(p => (p.First - p.Second).abs().mean().item<float>());
        return new QuickstartResult(trained.AdapterPath, gridPath, trained.LossCurvePath, comparison.Base, comparison.Lora, trainTime, evalTime, trained.Steps, finalLoss, diff);
    }
}
