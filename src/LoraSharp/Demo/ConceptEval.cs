using LoraSharp.Diffusion;
using LoraSharp.Imaging;
using SkiaSharp;
using static TorchSharp.torch;

namespace LoraSharp.Demo;

/// <summary>How often one arm (base or LoRA) produced the held-out concept.</summary>
public sealed record ConceptRate(string Arm, int Stars, int Images)
{
    public double Rate => Images == 0 ? 0 : (double)Stars / Images;
    public override string ToString() => $"{Arm}: {Stars}/{Images} = {Rate:P0}";
}

/// <summary>The outcome of <see cref="ConceptEval.Compare"/>: both rates, and the generated images (base, LoRA) per prompt and seed.</summary>
public sealed class ConceptComparison : IDisposable
{
    public required ConceptRate Base { get; init; }
    public required ConceptRate Lora { get; init; }
    public required IReadOnlyList<string> Prompts { get; init; }
    public required IReadOnlyList<long> Seeds { get; init; }
    /// <summary>[prompt][seed] images [3, H, W] in [−1, 1].</summary>
    public required Tensor[][] BaseImages { get; init; }
    public required Tensor[][] LoraImages { get; init; }

    /// <summary>A grid: one row per prompt; columns base seed 1..k, then LoRA seed 1..k (<paramref name="columns"/> seeds each), cells upscaled to <paramref name="cell"/> px.</summary>
    public SKBitmap Grid(int columns = 3, int cell = 160)
    {
        columns = Math.Min(columns, Seeds.Count);
        var images = new List<SKBitmap>();
        try
        {
            for (int p = 0; p < Prompts.Count; p++)
            {
                foreach (var arm in new[] { BaseImages, LoraImages })
                    for (int s = 0; s < columns; s++)
                    {
                        using var small = PngImage.ToBitmap(arm[p][s]);
                        images.Add(small.Resize(new SKImageInfo(cell, cell, SKColorType.Rgba8888, SKAlphaType.Opaque), new SKSamplingOptions(SKFilterMode.Nearest))
                            ?? throw new InvalidOperationException("could not resize an image"));
                    }
            }
            var cols = Enumerable.Range(0, columns).Select(s => $"base {Seeds[s]}").Concat(Enumerable.Range(0, columns).Select(s => $"LoRA {Seeds[s]}")).ToList();
            return ImageGrid.Compose(images, Prompts.Select(p => ShortLabel(p)).ToList(), cols);
        }
        finally
        {
            foreach (var i in images) i.Dispose();
        }
    }

    /// <summary>"a yellow sks star on a blue background, center" → "yellow on blue, center".</summary>
    public static string ShortLabel(string prompt, bool keepShape = false)
    {
        var m = System.Text.RegularExpressions.Regex.Match(prompt, @"^an? (\w+) (.+?) on an? (\w+) background, (.+)$");
        if (!m.Success) return prompt;
        return keepShape ? $"{m.Groups[1].Value} {m.Groups[2].Value} / {m.Groups[3].Value}" : $"{m.Groups[1].Value} on {m.Groups[3].Value}, {m.Groups[4].Value}";
    }

    public void Dispose()
    {
        foreach (var row in BaseImages.Concat(LoraImages)) foreach (var t in row) t.Dispose();
    }
}

/// <summary>
/// Measures the held-out concept: the same prompts and seeds through the txt2img pipeline without and with a LoRA
/// (<c>&lt;lora:NAME:1&gt;</c> from the pipeline's LoRA folder), each image read by <see cref="StarDetector"/>.
/// </summary>
public static class ConceptEval
{
    /// <summary>The default evaluation prompts: the trigger words in scenes of several colours, backgrounds and positions.</summary>
    public static IReadOnlyList<string> DefaultPrompts(string trigger = "sks star") =>
    [
        $"a yellow {trigger} on a blue background, center",
        $"a red {trigger} on a white background, left",
        $"a green {trigger} on a black background, right",
        $"a orange {trigger} on a purple background, top",
    ];

    public static ConceptComparison Compare(Txt2ImgPipeline pipeline, string loraName, IReadOnlyList<string> prompts, int seedsPerPrompt, long firstSeed = 1000,
        int steps = 25, double cfg = 5, string sampler = "DDIM", Action<int, int>? progress = null)
    {
        var seeds = Enumerable.Range(0, seedsPerPrompt).Select(i => firstSeed + i).ToArray();
        var baseImages = new Tensor[prompts.Count][];
        var loraImages = new Tensor[prompts.Count][];
        int done = 0, total = prompts.Count * 2;
        for (int p = 0; p < prompts.Count; p++)
        {
            baseImages[p] = Run(prompts[p]);
            progress?.Invoke(++done, total);
            loraImages[p] = Run($"{prompts[p]} <lora:{loraName}:1>");
            progress?.Invoke(++done, total);
        }
        int Count(Tensor[][] arm) => arm.Sum(row => row.Count(t => StarDetector.Read(t).IsStar));
        int n = prompts.Count * seeds.Length;
        return new ConceptComparison
        {
            Base = new ConceptRate("base", Count(baseImages), n),
            Lora = new ConceptRate("LoRA", Count(loraImages), n),
            Prompts = prompts, Seeds = seeds, BaseImages = baseImages, LoraImages = loraImages,
        };

        Tensor[] Run(string prompt)
        {
            using var result = pipeline.Generate(new Txt2ImgRequest
            {
                Prompt = prompt, Steps = steps, CfgScale = cfg, Sampler = sampler, Seed = seeds[0], BatchSize = seeds.Length,
                Width = DemoModel.ImageSize, Height = DemoModel.ImageSize,
            });
            return Enumerable.Range(0, seeds.Length).Select(i => result.Images![i].detach().clone()).ToArray();
        }
    }
}

/// <summary>Checks of a demo checkpoint on its own: what it draws for prompts, and how its VAE reproduces drawn shapes.</summary>
public static class DemoChecks
{
    /// <summary>Images [prompt][seed] ([3, H, W] in [−1, 1]) of the pipeline's model for each prompt and seed.</summary>
    public static Tensor[][] Generate(Txt2ImgPipeline pipeline, IReadOnlyList<string> prompts, int seeds, long firstSeed = 1000, int steps = 25, double cfg = 5, string sampler = "DDIM")
    {
        return prompts.Select(p =>
        {
            using var result = pipeline.Generate(new Txt2ImgRequest
            {
                Prompt = p, Steps = steps, CfgScale = cfg, Sampler = sampler, Seed = firstSeed, BatchSize = seeds,
                Width = DemoModel.ImageSize, Height = DemoModel.ImageSize,
            });
            return Enumerable.Range(0, seeds).Select(i => result.Images![i].detach().clone()).ToArray();
        }).ToArray();
    }

    /// <summary>A grid of [row][column] images upscaled to <paramref name="cell"/> px.</summary>
    public static SKBitmap Grid(Tensor[][] images, IReadOnlyList<string> rowLabels, IReadOnlyList<string> columnLabels, int cell = 128)
    {
        var bitmaps = new List<SKBitmap>();
        try
        {
            foreach (var row in images)
                foreach (var t in row)
                {
                    using var small = PngImage.ToBitmap(t);
                    bitmaps.Add(small.Resize(new SKImageInfo(cell, cell, SKColorType.Rgba8888, SKAlphaType.Opaque), new SKSamplingOptions(SKFilterMode.Nearest))
                        ?? throw new InvalidOperationException("could not resize an image"));
                }
            return ImageGrid.Compose(bitmaps, rowLabels, columnLabels);
        }
        finally
        {
            foreach (var b in bitmaps) b.Dispose();
        }
    }

    /// <summary>
    /// Draws <paramref name="count"/> scenes of <paramref name="shape"/>, encodes them with the model's VAE (posterior
    /// mean) and decodes them: the fraction the star detector reads as stars, and the reconstructions.
    /// </summary>
    public static (double StarRate, Tensor Reconstructions, IReadOnlyList<StarReading> Readings) VaeRoundTripReadings(Models.StableDiffusion.StableDiffusionModel model, DemoShape shape, int count, int seed)
    {
        var (rate, recon) = VaeRoundTrip(model, shape, count, seed);
        var readings = Enumerable.Range(0, count).Select(i => StarDetector.Read(recon[i])).ToList();
        return (rate, recon, readings);
    }

    /// <summary>
    /// A grid of VAE round trips: per shape one row of <paramref name="count"/> drawn scenes and one row of their
    /// reconstructions (what the decoder can draw at all — the ceiling for any LoRA on the UNet).
    /// </summary>
    public static SKBitmap VaeRoundTripGrid(Models.StableDiffusion.StableDiffusionModel model, int count = 6, int seed = 99)
    {
        var rows = new List<Tensor[]>();
        var labels = new List<string>();
        try
        {
            foreach (var shape in Enum.GetValues<DemoShape>())
            {
                var (pixels, _) = ShapeScenes.Batch(count, DemoModel.ImageSize, seed, [shape]);
                using (pixels)
                {
                    using var unit = ShapeScenes.ToUnit(pixels);
                    rows.Add(Enumerable.Range(0, count).Select(i => unit[i].clone()).ToArray());
                }
                var (_, recon) = VaeRoundTrip(model, shape, count, seed);
                using (recon) rows.Add(Enumerable.Range(0, count).Select(i => recon[i].clone()).ToArray());
                labels.Add($"{ShapeScenes.ShapeName(shape)}: drawn");
                labels.Add($"{ShapeScenes.ShapeName(shape)}: VAE");
            }
            return Grid(rows.ToArray(), labels, Enumerable.Range(0, count).Select(i => $"#{i + 1}").ToList(), cell: 96);
        }
        finally
        {
            foreach (var row in rows) foreach (var t in row) t.Dispose();
        }
    }

    public static (double StarRate, Tensor Reconstructions) VaeRoundTrip(Models.StableDiffusion.StableDiffusionModel model, DemoShape shape, int count, int seed)
    {
        using var noGrad = no_grad();
        using var scope = NewDisposeScope();
        var vae = model.Vae ?? throw new LoraSharpException("the model has no VAE", key: "vae");
        var device = vae.parameters().First().device;
        var (pixels, _) = ShapeScenes.Batch(count, DemoModel.ImageSize, seed, [shape]);
        using var dist = vae.Encode(ShapeScenes.ToUnit(pixels).to(device));
        var recon = vae.Decode(dist.Mean).to_type(ScalarType.Float32);
        double rate = Enumerable.Range(0, count).Average(i => StarDetector.Read(recon[i]).IsStar ? 1.0 : 0.0);
        return (rate, recon.MoveToOuterDisposeScope());
    }
}
